"""Benchmark: a 64-trial Optuna search through runjobs against the same search in Ray Tune.

Anchor: ../shared/anchors/ray_tune_optuna.py (OptunaSearch in a Tuner, two trials at a
time, reuse_actors, TensorFlow's whole loop in one tf.function). runjobs:
`runjobs submit examples/optuna-search.yaml` into a new directory (the same space: framework,
lr log-uniform in [0.001, 0.3], seed in [0, 999]; the default job otherwise; parallel 2).
Both as fresh processes that start their own local Ray, alternating order, median of rounds.

    .venv/bin/python bench/bench_search.py [--rounds 3] [--trials 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings, timed  # noqa: E402

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
SPEC = HERE.parent / "examples" / "optuna-search.yaml"
ANCHOR = HERE.parent.parent / "shared" / "anchors" / "ray_tune_optuna.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=64)
    arguments = parser.parse_args()
    if not ANCHOR.exists():
        sys.exit(
            f"bench_search: the anchor {ANCHOR} is missing; it sits in shared/anchors beside the project"
        )
    tune_label, ours_label = (
        f"Ray Tune + OptunaSearch, {arguments.trials} trials",
        "runjobs submit optuna-search.yaml",
    )
    results: dict[str, list[float]] = {tune_label: [], ours_label: []}
    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch) / "search.yaml"
        spec.write_text(SPEC.read_text().replace("trials: 64", f"trials: {arguments.trials}"))
        for index in range(arguments.rounds):
            order = ["tune", "runjobs"] if index % 2 == 0 else ["runjobs", "tune"]
            for side in order:
                if side == "tune":
                    os.environ["TRIALS"] = str(arguments.trials)
                    results[tune_label].append(timed([sys.executable, str(ANCHOR)]))
                else:
                    command = [RUNJOBS, "submit", str(spec), "--output", str(Path(scratch) / f"run{index}")]
                    results[ours_label].append(timed(command))
            print(f"round {index + 1}/{arguments.rounds} done", file=sys.stderr)
    rounds = arguments.rounds
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Rounds: {rounds}, median shown.\n")
    print_timings(results)
    anchor, ours = statistics.median(results[tune_label]), statistics.median(results[ours_label])
    print(f"\nrunjobs / Ray Tune = {ours / anchor:.3f} (target <= 0.3)")


if __name__ == "__main__":
    main()
