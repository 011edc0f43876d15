"""Benchmark: this checkout against an earlier revision, side by side, on submit and the sweep.

A restructuring must not make runjobs slower. The earlier revision is checked out into a
temporary git worktree and run from there with PYTHONPATH (its Ray workers inherit it),
against the same virtualenv; each round runs the default `runjobs submit` and
`runjobs submit examples/lr-seed.yaml` with both revisions, alternating which goes
first. Prints medians as Markdown for docs/BENCHMARKS.md.

    .venv/bin/python bench/bench_revisions.py REVISION [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings  # noqa: E402

# The CLI's entry point, started as `python -c` so PYTHONPATH decides which runjobs runs.
ENTRY = "from jobs.cli import main; main()"


def timed_run(tree: Path, arguments: list[str]) -> float:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", ENTRY, *arguments],
        check=True, cwd=tree, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the earlier revision, e.g. a commit id or main~3")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", options.revision], cwd=REPOSITORY, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="runjobs-bench-") as scratch:
        earlier = Path(scratch) / "earlier"
        subprocess.run(["git", "worktree", "add", "--detach", str(earlier), commit], cwd=REPOSITORY,
                       check=True, capture_output=True)  # fmt: skip
        try:
            trees = {f"earlier ({commit})": earlier, "this checkout": REPOSITORY}
            for index in range(options.rounds):
                names = list(trees) if index % 2 == 0 else list(reversed(trees))
                for name in names:
                    tree = trees[name]
                    output = Path(scratch) / f"{index}-{name.split()[0]}"
                    results.setdefault(f"{name}: runjobs submit", []).append(
                        timed_run(tree, ["submit", "--output", str(output / "submit")])
                    )
                    sweep = ["submit", "examples/lr-seed.yaml", "--output", str(output / "sweep")]
                    results.setdefault(f"{name}: runjobs submit lr-seed.yaml", []).append(
                        timed_run(tree, sweep)
                    )
                print(f"round {index + 1}/{options.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=REPOSITORY,
                           check=False, capture_output=True)  # fmt: skip
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Rounds: {options.rounds}, "
          "alternating order, median shown.\n")  # fmt: skip
    print_timings(results)
    for workload in ("runjobs submit", "runjobs submit lr-seed.yaml"):
        old = statistics.median(results[f"earlier ({commit}): {workload}"])
        new = statistics.median(results[f"this checkout: {workload}"])
        print(f"\n{workload}: this checkout / {commit} = {new / old:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
