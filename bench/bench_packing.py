"""Benchmark: packed sweeps (issue 13), the 8-job sweep measured side by side in the same run.

Each round runs, end to end with its embedded Ray's start, in fresh processes:

1. the 8-job lr x seed sweep (examples/lr-seed.yaml: 2 frameworks x 2 learning rates x
   2 seeds, the article's data, the compiled loop, 500 epochs);
2. the same job at 1,000 configs (2 frameworks x 25 learning rates x 20 seeds);
3. the same job at 10,000 configs (2 frameworks x 50 learning rates x 100 seeds), with
   the driver's peak memory (its resident set, sampled every 50 ms), and then
   `runjobs report DIR` on its directory.

The marginal cost of a packed config is the slope between 1,000 and 10,000 configs:
(T10000 - T1000) / 9000. Every process runs with Python's bytecode cache on, as on a
user's machine (this workplace sets PYTHONDONTWRITEBYTECODE).

    .venv/bin/python bench/bench_packing.py [--rounds 3] [--skip-10000]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings  # noqa: E402
from bench_warm import ENVIRONMENT, RUNJOBS, SWEEP  # noqa: E402


def grid_spec(directory: Path, rates: int, seeds: int) -> Path:
    """The 8-job sweep's job over `rates` learning rates (0.001 .. 0.1, log-spaced) and `seeds` seeds."""
    values = [round(0.001 * 100 ** (index / max(rates - 1, 1)), 6) for index in range(rates)]
    path = directory / f"sweep-{2 * rates * seeds}.yaml"
    path.write_text(
        f"name: packed-{2 * rates * seeds}\n"
        "defaults: {epochs: 500, init: framework}\n"
        f"grid:\n  framework: [tensorflow, torch]\n  lr: {values}\n  seed: {list(range(seeds))}\n"
    )
    return path


def run_measured(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds of `command`, its own peak resident memory in MiB (sampled), and that peak
    until its last job was recorded (its progress line `[N/N done]`): training and recording
    alone, before the reports are built from every record."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT
    )
    peak = [0, 0]  # overall, until the last job was recorded
    recording = threading.Event()
    finished = threading.Event()

    def sample() -> None:
        watched = psutil.Process(process.pid)
        while not finished.is_set():
            try:
                rss = watched.memory_info().rss
            except psutil.Error:
                return
            peak[0] = max(peak[0], rss)
            if not recording.is_set():
                peak[1] = max(peak[1], rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors = []
    for line in process.stderr:
        errors.append(line)
        done = re.search(r"\[(\d+)/(\d+) done", line)
        if done and done.group(1) == done.group(2):
            recording.set()
    process.wait()
    finished.set()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{''.join(errors[-40:])}")
    return elapsed, peak[0] / 2**20, (peak[1] or peak[0]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-10000", action="store_true")
    arguments = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    sweeps = {"8 configs": SWEEP, "1,000 configs": grid_spec(scratch, 25, 20)}
    if not arguments.skip_10000:
        sweeps["10,000 configs"] = grid_spec(scratch, 50, 100)
    results: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {}
    training_memory: dict[str, list[float]] = {}
    for round_number in range(arguments.rounds):
        for name, spec in sweeps.items():
            output = scratch / f"{name.split()[0].replace(',', '')}-{round_number}"
            seconds, peak, training_peak = run_measured(
                [RUNJOBS, "submit", str(spec), "--output", str(output)]
            )
            results.setdefault(f"submit, {name}", []).append(seconds)
            memory.setdefault(name, []).append(peak)
            training_memory.setdefault(name, []).append(training_peak)
            print(
                f"round {round_number + 1}: {name}: {seconds:.2f} s, driver peak {peak:.0f} MiB "
                f"({training_peak:.0f} MiB until the last job was recorded)",
                flush=True,
            )
            if name.startswith("10,000"):
                seconds, _, _ = run_measured([RUNJOBS, "report", str(output)])
                results.setdefault("runjobs report, 10,000 configs", []).append(seconds)
                print(f"round {round_number + 1}: runjobs report: {seconds:.2f} s", flush=True)
    print(f"\nmachine: {machine()}; {time.strftime('%Y-%m-%d')}; {arguments.rounds} round(s)\n")
    print_timings(results)
    base = statistics.median(results["submit, 8 configs"])
    thousand = statistics.median(results["submit, 1,000 configs"])
    summary = {"1,000 / 8": thousand / base}
    if "submit, 10,000 configs" in results:
        ten_thousand = statistics.median(results["submit, 10,000 configs"])
        summary["10,000 / 8"] = ten_thousand / base
        summary["marginal ms per config"] = 1000 * (ten_thousand - thousand) / 9000
    summary["driver peak MiB (median)"] = {name: statistics.median(values) for name, values in memory.items()}
    summary["driver peak MiB until the last job was recorded (median)"] = {
        name: statistics.median(values) for name, values in training_memory.items()
    }
    print("\n" + json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
