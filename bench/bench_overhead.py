"""Benchmark: per-job overhead of a sweep of 1-epoch jobs, and driver memory over a long sweep.

Per-job overhead: (wall time of an N-job sweep - wall time of a 1-job sweep) / (N - 1),
each `runjobs submit SPEC` a fresh process with its embedded Ray, per framework. Memory:
the driver's resident set size sampled every 0.2 s through a 2,000-job sweep; flat means
the late samples are no higher than the early ones.

    .venv/bin/python bench/bench_overhead.py [--jobs 200] [--memory-jobs 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine  # noqa: E402

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))


def sweep_spec(directory: Path, framework: str, jobs: int) -> Path:
    path = directory / f"{framework}-{jobs}.yaml"
    seeds = ", ".join(str(seed) for seed in range(jobs))
    path.write_text(
        f"name: overhead\ndefaults: {{epochs: 1, framework: {framework}}}\ngrid: {{seed: [{seeds}]}}\n"
    )
    return path


def run(spec: Path, output: Path) -> tuple[float, list[float]]:
    """Wall time and the driver's RSS samples (MiB) of one submit."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [RUNJOBS, "submit", str(spec), "--output", str(output), "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    samples = []
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            samples.append(watched.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    if process.wait() != 0:
        raise SystemExit(f"runjobs submit {spec} failed")
    return time.perf_counter() - started, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--memory-jobs", type=int, default=2000)
    parser.add_argument("--memory-only", action="store_true", help="Skip the per-job overhead runs.")
    arguments = parser.parse_args()
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.\n")
    print("| framework | 1 job (s) | sweep (s) | jobs | per-job overhead (ms) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for framework in () if arguments.memory_only else ("torch", "tensorflow"):
            single, _ = run(sweep_spec(root, framework, 1), root / f"{framework}-1")
            many, _ = run(sweep_spec(root, framework, arguments.jobs), root / f"{framework}-many")
            overhead_ms = (many - single) / (arguments.jobs - 1) * 1e3
            print(f"| {framework} | {single:.2f} | {many:.2f} | {arguments.jobs} | {overhead_ms:.1f} |")
            sys.stdout.flush()
        wall, samples = run(sweep_spec(root, "torch", arguments.memory_jobs), root / "memory")
    # The run starts with the interpreter and Ray's start (memory rising) and ends with
    # the report built from every record (the peak); in between, flat means the driver
    # holds nothing per finished job.
    points = ", ".join(
        f"{share}% {samples[min(len(samples) * share // 100, len(samples) - 1)]:.0f}"
        for share in (20, 35, 50, 65, 80, 90)
    )
    print(
        f"\nDriver memory over {arguments.memory_jobs} torch jobs ({wall:.0f} s): "
        f"peak {max(samples):.0f} MiB; "
        f"RSS (MiB) at shares of the run's time: {points}."
    )


if __name__ == "__main__":
    main()
