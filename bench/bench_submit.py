"""Benchmark: the default `runjobs submit`, end to end, against the article's two scripts.

Each round runs the anchor (the Keras script, then the torch script, as a person would)
and `runjobs submit` (embedded local Ray started and stopped inside the command), in
alternating order, as fresh processes. Prints the medians and runjobs' breakdown as
Markdown for docs/BENCHMARKS.md.

    .venv/bin/python bench/bench_submit.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNJOBS = str(Path(sys.executable).with_name("runjobs"))


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def anchor_round() -> dict[str, float]:
    keras = timed([sys.executable, str(HERE / "tutorial_keras.py")])
    torch = timed([sys.executable, str(HERE / "tutorial_torch.py")])
    return {"keras script": keras, "torch script": torch, "both scripts": keras + torch}


def runjobs_round(output: Path) -> dict[str, float]:
    wall = timed([RUNJOBS, "submit", "--output", str(output)])
    report = json.loads((output / "report.json").read_text())
    driver = report["driver"]["timings"]
    other = wall - driver["connect_s"] - driver["jobs_s"] - driver["disconnect_s"]
    row = {
        "runjobs submit": wall,
        "Ray start (connect_s)": driver["connect_s"],
        "jobs, both in parallel (jobs_s)": driver["jobs_s"],
        "Ray shutdown (disconnect_s)": driver["disconnect_s"],
        "CLI import, planning, report": other,
    }
    for job in report["jobs"]:
        for key in ("startup_s", "setup_s", "train_s"):
            row[f"{job['framework']} {key}"] = job["timings"][key]
    return row


def print_timings(results: dict[str, list[float]]) -> None:
    """The Markdown table every benchmark prints: median, min and max of each measurement."""
    print("| measurement | median (s) | min (s) | max (s) |")
    print("|---|---|---|---|")
    for key, values in results.items():
        print(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, no GPU, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(rounds):
            # Alternate which side goes first so neither always runs on a warmer cache.
            order = [anchor_round, "runjobs"] if index % 2 == 0 else ["runjobs", anchor_round]
            for side in order:
                row = runjobs_round(Path(scratch) / f"run{index}") if side == "runjobs" else side()
                for key, value in row.items():
                    results.setdefault(key, []).append(value)
            print(f"round {index + 1}/{rounds} done", file=sys.stderr)

    anchor = statistics.median(results["both scripts"])
    submit = statistics.median(results["runjobs submit"])
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Rounds: {rounds}, median shown.\n")
    print_timings(results)
    print(f"\nrunjobs submit / both scripts = {submit / anchor:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
