"""Benchmarks for the multi-device variants.

1. End to end: a 2-worker torch ddp job through `runjobs submit` against Ray Train's
   TorchTrainer with 2 workers on the same article job (bench/ray_train_ddp.py), both as
   fresh processes that start their own local Ray, alternating order, median of rounds.
2. Scaling: epoch time of each variant against its single-device twin on synthetic data
   of 1e5, 1e6 and 1e7 rows, full batch, every job alone on one embedded Ray (so jobs do
   not share the 2 cores), with parallel efficiency = single / (workers x variant).

    .venv/bin/python bench/bench_variants.py [--rounds 3] [--sizes 100000,1000000,10000000]

Needs Ray Train for the anchor: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings, timed  # noqa: E402

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
EPOCHS_FOR_ROWS = {100_000: 50, 1_000_000: 20, 10_000_000: 5}
VARIANTS = [("tensorflow", "single"), ("tensorflow", "mirrored"), ("tensorflow", "multiworker"),
            ("torch", "single"), ("torch", "ddp")]  # fmt: skip


def end_to_end(rounds: int) -> None:
    results: dict[str, list[float]] = {"Ray Train TorchTrainer, 2 workers": [], "runjobs ddp, 2 workers": []}
    breakdown: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(rounds):
            sides = ["anchor", "runjobs"] if index % 2 == 0 else ["runjobs", "anchor"]
            for side in sides:
                if side == "anchor":
                    elapsed = timed([sys.executable, str(HERE / "ray_train_ddp.py")])
                    results["Ray Train TorchTrainer, 2 workers"].append(elapsed)
                    continue
                output = Path(scratch) / f"ddp{index}"
                elapsed = timed(
                    [RUNJOBS, "submit", "--framework", "torch", "--variant", "ddp", "--workers", "2",
                     "--output", str(output)]
                )  # fmt: skip
                results["runjobs ddp, 2 workers"].append(elapsed)
                report = json.loads((output / "report.json").read_text())
                job = report["jobs"][0]
                for key, value in {
                    "Ray start": report["driver"]["timings"]["connect_s"],
                    "job total (actors, import, train)": job["timings"]["total_s"],
                    "startup_s (rank 0)": job["timings"]["startup_s"],
                    "setup_s (process group, DDP)": job["timings"]["setup_s"],
                    "train_s (rank 0)": job["timings"]["train_s"],
                    "Ray shutdown": report["driver"]["timings"]["disconnect_s"],
                }.items():
                    breakdown.setdefault(key, []).append(value)
            print(f"round {index + 1}/{rounds} done", file=sys.stderr)
    print_timings({**results, **breakdown})
    anchor = statistics.median(results["Ray Train TorchTrainer, 2 workers"])
    ours = statistics.median(results["runjobs ddp, 2 workers"])
    print(f"\nrunjobs ddp / Ray Train = {ours / anchor:.2f} (target <= 0.3)\n")


def scaling(sizes: list[int]) -> None:
    import ray

    from jobs.pipeline import submit
    from jobs.plan.planning import SubmitRequest
    from jobs.plan.spec import Overrides
    from jobs.run.progress import LineProgress

    class SilentProgress(LineProgress):
        def say(self, message: str) -> None:
            pass

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print("| rows | epochs | framework | variant | epoch median (ms) | single (ms) | speed-up | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for rows in sizes:
                epochs = EPOCHS_FOR_ROWS.get(rows, 10)
                single: dict[str, float] = {}
                for framework, variant in VARIANTS:
                    overrides = Overrides()
                    for assignment in (f"data=synthetic:rows={rows},features=1,noise=0.1,seed=0",
                                       f"epochs={epochs}", "normalize=true", "lr=0.05"):  # fmt: skip
                        overrides.add_assignment(assignment)
                    if variant != "single":
                        overrides.add_assignment("workers=2")
                    request = SubmitRequest(
                        (framework,), overrides, variants=(variant,),
                        output=Path(scratch) / f"{rows}-{framework}-{variant}",
                    )  # fmt: skip
                    job = submit(request, SilentProgress()).report["jobs"][0]
                    epoch_s = job["timings"]["epoch_s_median"]
                    if variant == "single":
                        single[framework] = epoch_s
                        print(f"| {rows:.0e} | {epochs} | {framework} | single | {epoch_s * 1e3:.2f} | | | |")
                        continue
                    speedup = single[framework] / epoch_s
                    print(
                        f"| {rows:.0e} | {epochs} | {framework} | {variant} x2 | {epoch_s * 1e3:.2f} | "
                        f"{single[framework] * 1e3:.2f} | {speedup:.2f} | {speedup / 2:.0%} |"
                    )
                    sys.stdout.flush()
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--skip-end-to-end", action="store_true")
    arguments = parser.parse_args()
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.\n")
    if not arguments.skip_end_to_end:
        end_to_end(arguments.rounds)
    scaling([int(size) for size in arguments.sizes.split(",")])


if __name__ == "__main__":
    main()
