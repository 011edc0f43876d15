"""Benchmark: the 8-job lr x seed sweep through runjobs against Ray Tune.

Anchor: bench/ray_tune_sweep.py (the article's code in Tune function trainables). runjobs:
`runjobs submit examples/lr-seed.yaml` into a new directory. Both as fresh processes that
start their own local Ray, alternating order, median of rounds.

    .venv/bin/python bench/bench_sweep.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings, timed  # noqa: E402

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
SPEC = HERE.parent / "examples" / "lr-seed.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    results: dict[str, list[float]] = {"Ray Tune, 8 trials": [], "runjobs submit lr-seed.yaml": []}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(rounds):
            order = ["tune", "runjobs"] if index % 2 == 0 else ["runjobs", "tune"]
            for side in order:
                if side == "tune":
                    results["Ray Tune, 8 trials"].append(
                        timed([sys.executable, str(HERE / "ray_tune_sweep.py")])
                    )
                else:
                    command = [RUNJOBS, "submit", str(SPEC), "--output", str(Path(scratch) / f"run{index}")]
                    results["runjobs submit lr-seed.yaml"].append(timed(command))
            print(f"round {index + 1}/{rounds} done", file=sys.stderr)
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Rounds: {rounds}, median shown.\n")
    print_timings(results)
    anchor = statistics.median(results["Ray Tune, 8 trials"])
    ours = statistics.median(results["runjobs submit lr-seed.yaml"])
    print(f"\nrunjobs / Ray Tune = {ours / anchor:.3f} (target <= 0.12)")


if __name__ == "__main__":
    main()
