"""Benchmark: warm everywhere (issue 15), each side by side with its anchor in one run.

1. A running local cluster (a `ray start --head` this script owns, ended by its pid): the
   default `runjobs submit --address` and the 8-job lr x seed sweep, each submitted twice;
   the second reuses the first's warm workers. Rounds repeat the pair after `runjobs pool
   stop`, so every first submit is cold.
2. The embedded default path, fresh processes in alternating order: the 8-job sweep
   against the expert Ray Tune sweep (../shared/anchors/ray_tune_sweep_expert.py) and the
   tutorial-style one (bench/ray_tune_sweep.py); the default submit against the article's
   two scripts; the 2-worker ddp job against Ray Train's TorchTrainer
   (../shared/anchors/ray_train_ddp.py).

Every process runs with Python's bytecode cache on, as on a user's machine (this
workplace sets PYTHONDONTWRITEBYTECODE, which makes every import compile its source).

    .venv/bin/python bench/bench_warm.py [--rounds 3] [--tutorial-rounds 1] [--skip-embedded]

Needs Ray Tune and Ray Train for the anchors: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings  # noqa: E402

ROOT = HERE.parent
RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
RAY = str(Path(sys.executable).with_name("ray"))
ANCHORS = ROOT.parent / "shared" / "anchors"
SWEEP = ROOT / "examples" / "lr-seed.yaml"
ENVIRONMENT = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENVIRONMENT)
    return time.perf_counter() - started


class LocalCluster:
    """A two-CPU `ray start --head --block` of this script's own, ended by its process group."""

    def __init__(self, scratch: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.temp_dir = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
        self.log = scratch / "ray-start.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                 "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                 "--temp-dir", self.temp_dir, "--disable-usage-stats", "--block"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENVIRONMENT,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start did not come up:\n{self.log.read_text()}")
            time.sleep(0.5)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def running_cluster(rounds: int, scratch: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    cluster = LocalCluster(scratch)
    try:
        for index in range(rounds):
            for label, spec in (("default submit", []), ("8-job sweep", [str(SWEEP)])):
                timed([RUNJOBS, "pool", "stop", "--address", cluster.address])
                for attempt in ("first (cold)", "second (warm)"):
                    output = scratch / f"cluster-{label.replace(' ', '-')}-{index}-{attempt[:5]}"
                    seconds = timed(
                        [RUNJOBS, "submit", *spec, "--address", cluster.address, "--output", str(output)]
                    )
                    results.setdefault(f"running cluster: {label}, {attempt}", []).append(seconds)
            print(f"running cluster: round {index + 1}/{rounds} done", file=sys.stderr)
        timed([RUNJOBS, "pool", "stop", "--address", cluster.address])
    finally:
        cluster.stop()
    return results


def embedded(rounds: int, tutorial_rounds: int, scratch: Path) -> dict[str, list[float]]:
    sides = {
        "embedded: runjobs 8-job sweep": lambda index: timed(
            [RUNJOBS, "submit", str(SWEEP), "--output", str(scratch / f"sweep-{index}")]
        ),
        "embedded: expert Ray Tune sweep (anchor)": lambda index: timed(
            [sys.executable, str(ANCHORS / "ray_tune_sweep_expert.py")]
        ),
        "embedded: runjobs default submit": lambda index: timed(
            [RUNJOBS, "submit", "--output", str(scratch / f"default-{index}")]
        ),
        "embedded: article's two scripts (anchor)": lambda index: (
            timed([sys.executable, str(HERE / "tutorial_keras.py")])
            + timed([sys.executable, str(HERE / "tutorial_torch.py")])
        ),
        "embedded: runjobs 2-worker ddp": lambda index: timed(
            [
                RUNJOBS,
                "submit",
                "--framework",
                "torch",
                "--variant",
                "ddp",
                "--workers",
                "2",
                "--output",
                str(scratch / f"ddp-{index}"),
            ]
        ),  # fmt: skip
        "embedded: Ray Train TorchTrainer, 2 workers (anchor)": lambda index: timed(
            [sys.executable, str(ANCHORS / "ray_train_ddp.py")]
        ),
    }
    results: dict[str, list[float]] = {}
    for index in range(rounds):
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        for label in order:
            results.setdefault(label, []).append(sides[label](index))
        if index < tutorial_rounds:
            results.setdefault("embedded: tutorial-style Ray Tune sweep (anchor)", []).append(
                timed([sys.executable, str(HERE / "ray_tune_sweep.py")])
            )
        print(f"embedded: round {index + 1}/{rounds} done", file=sys.stderr)
    return results


def ratio(results: dict[str, list[float]], ours: str, anchor: str, target: float) -> str:
    value = statistics.median(results[ours]) / statistics.median(results[anchor])
    return f"{ours} / {anchor.removesuffix(' (anchor)')}: {value:.3f} (target <= {target})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tutorial-rounds", type=int, default=1, help="rounds of the ~2-minute tutorial sweep"
    )
    parser.add_argument("--skip-embedded", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = running_cluster(arguments.rounds, Path(scratch))
        if not arguments.skip_embedded:
            results.update(embedded(arguments.rounds, arguments.tutorial_rounds, Path(scratch)))
    date = time.strftime("%Y-%m-%d")
    print(f"Machine: {machine()}. Date: {date}. Rounds: {arguments.rounds}, median shown.\n")
    print_timings(results)
    print()
    print("running cluster, second default submit: target <= 1.5 s")
    print("running cluster, second 8-job sweep: target <= 2 s")
    if not arguments.skip_embedded:
        print(
            ratio(results, "embedded: runjobs 8-job sweep", "embedded: expert Ray Tune sweep (anchor)", 0.45)
        )
        print(
            ratio(
                results,
                "embedded: runjobs 8-job sweep",
                "embedded: tutorial-style Ray Tune sweep (anchor)",
                0.1,
            )
        )
        print(
            ratio(
                results, "embedded: runjobs default submit", "embedded: article's two scripts (anchor)", 0.4
            )
        )
        print(
            ratio(
                results,
                "embedded: runjobs 2-worker ddp",
                "embedded: Ray Train TorchTrainer, 2 workers (anchor)",
                0.3,
            )
        )


if __name__ == "__main__":
    main()
