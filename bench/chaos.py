"""Fault harness: rounds of a real sweep on a real two-node cluster, each disturbed by one fault.

Each round runs `runjobs submit SWEEP` against a two-node cluster on loopback (a head
and a worker node, `ray start` processes this harness owns) and, at a random moment,
SIGKILLs the driver, a warm worker, a rank of the ddp job or the worker node, or sends
`runjobs cancel`; then it submits again (`--rerun failed`) until the run is complete.
After each round it checks what a user relies on:

- every job has exactly one final record, and every one succeeded in the end;
- every result that had succeeded before the fault is still there, unchanged;
- each result equals the undisturbed run's (parameters within 1e-6);
- no Ray actor or placement group of the run is left on the cluster, apart from the warm
  workers kept on purpose for the next submit (idle, in runjobs' namespace, no run holding
  them once a dead driver's lease has run out: jobs/run/warm_pool.py);
- the ledger passes SQLite's `PRAGMA integrity_check`;
- no runjobs command printed a traceback.

    .venv/bin/python bench/chaos.py --rounds 100 [--seed 0] [--kinds driver,cancel] [--json FILE]

Exits 1 when any round broke one of these. `make chaos` runs it; tests/test_chaos.py runs
a few rounds in CI; docs/RELIABILITY.md keeps the figures of a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from jobs.run.authentication import choose_mode_for  # noqa: E402
from tests.helpers import RUNJOBS, RayNode, free_port, wait_for_http  # noqa: E402

FAULTS = ("driver", "warm_worker", "ddp_rank", "node", "cancel")
# Long enough that every fault finds something running; retries let a job whose worker
# or node died start again within the run. One job a process (packing off), so a fault
# lands on some jobs and spares others.
SWEEP = """name: chaos
defaults: {epochs: 4000, retries: 2, setup_timeout_s: 20, packing: off}
grid: {framework: [tensorflow, torch], seed: [0, 1, 2]}
jobs:
  - {framework: torch, variant: ddp, workers: 2, epochs: 6000}
"""
TOLERANCE = 1e-6


@dataclass
class RoundResult:
    kind: str
    injected: bool = False
    submits: int = 0
    lost: list[str] = field(default_factory=list)  # succeeded before the fault, not after
    unfinished: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    integrity: str = "ok"
    tracebacks: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unfinished or self.mismatched or self.duplicated or self.leftovers
                    or self.integrity != "ok" or self.tracebacks)  # fmt: skip


class Cluster:
    """A head with the state API and a worker node, on loopback, owned by this harness."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        port, dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.head = RayNode.head(
            directory / "head.log", port, "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        )  # fmt: skip
        self.worker = None
        try:
            wait_for_http(f"{self.dashboard}/api/version")
            # The state API (for victims and leftovers) presents a token only if the head wants one.
            choose_mode_for(self.dashboard)
            self.start_worker()
        except BaseException:
            self.stop()
            raise

    def start_worker(self) -> None:
        log = self.directory / f"worker-{time.monotonic_ns()}.log"
        self.worker = RayNode.worker(log, self.address, "--num-cpus", "2", "--num-gpus", "0")

    def crash_worker(self) -> None:
        self.worker.crash()

    def ensure_worker(self) -> None:
        if self.worker is None or self.worker.process.poll() is not None:
            self.start_worker()

    def runjobs_actors(self) -> list[dict]:
        """The run's actors still alive; kept warm workers count only while a run still holds them."""
        from ray.util.state import list_actors

        alive = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=10_000)
        actors = [actor for actor in alive if (actor.name or "").startswith("runjobs:")]
        kept = [actor for actor in actors if actor.ray_namespace == "runjobs"]
        if not kept:
            return actors
        held = self.held_warm_workers()
        return [actor for actor in actors if actor not in kept or actor.name in held]

    def held_warm_workers(self) -> set[str]:
        """Kept warm workers that a run holds or that are busy (`runjobs pool status`)."""
        status = subprocess.run(
            [RUNJOBS, "pool", "status", "--address", self.address, "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if status.returncode != 0:
            return {"runjobs pool status failed: " + status.stderr.strip()}
        return {row["name"] for row in json.loads(status.stdout) if row.get("state") != "idle"}

    def runjobs_placement_groups(self) -> list[str]:
        from ray.util.state import list_placement_groups

        groups = list_placement_groups(address=self.dashboard, limit=10_000)
        return [group.name for group in groups if (group.name or "").startswith("runjobs:")
                and group.state != "REMOVED"]  # fmt: skip

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.head.stop()


def submit(cluster: Cluster, spec: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [RUNJOBS, "submit", str(spec), "--address", cluster.address, "--output", str(output), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def ledger_rows(output: Path) -> list[tuple[str, str, str | None]]:
    path = output / "ledger.sqlite"
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute("SELECT id, status, record FROM jobs ORDER BY position").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


def succeeded_parameters(output: Path) -> dict[str, list[float]]:
    parameters = {}
    for job_id, status, record in ledger_rows(output):
        if status == "succeeded" and record:
            params = json.loads(record)["params"]
            parameters[job_id] = [*params["weights"], params["bias"]]
    return parameters


def wait_until(condition, limit_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return False


def inject(kind: str, cluster: Cluster, driver: subprocess.Popen, output: Path, rng: random.Random) -> bool:
    """Wait for the fault's target, then strike at a random moment; whether a fault was injected."""
    if not wait_until(lambda: any(status == "running" for _, status, _ in ledger_rows(output)), 120):
        return False
    if kind in ("warm_worker", "ddp_rank"):
        marker = "runjobs:warm:" if kind == "warm_worker" else ":rank1"

        def targets() -> list[dict]:
            try:
                return [actor for actor in cluster.runjobs_actors() if marker in actor.name and actor.pid]
            except Exception:  # the state API between two answers: ask again
                return []

        if not wait_until(lambda: bool(targets()), 90, step_s=0.5):
            return False
        time.sleep(rng.uniform(0.0, 1.5))
        found = targets()
        if not found:
            return False
        try:
            os.kill(rng.choice(found).pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    time.sleep(rng.uniform(0.0, 3.0))
    if driver.poll() is not None:
        return False
    if kind == "driver":
        driver.kill()
    elif kind == "node":
        cluster.crash_worker()
    elif kind == "cancel":
        subprocess.run([RUNJOBS, "cancel", str(output)], capture_output=True, text=True, timeout=120)
    return True


def run_round(
    kind: str, cluster: Cluster, spec: Path, output: Path, baseline, rng: random.Random
) -> RoundResult:
    started = time.monotonic()
    result = RoundResult(kind)
    cluster.ensure_worker()
    # Each round starts from an empty pool, so its first submit pays the imports and runs
    # long enough for the fault to land; its re-submits reuse the workers it kept.
    subprocess.run([RUNJOBS, "pool", "stop", "--address", cluster.address], capture_output=True, timeout=120)
    driver = submit(cluster, spec, output)
    result.submits = 1
    result.injected = inject(kind, cluster, driver, output, rng)
    before = succeeded_parameters(output)
    stderr = driver.communicate(timeout=600)[1]
    result.tracebacks += stderr.count("Traceback (most recent call last)")
    cluster.ensure_worker()  # a crashed node comes back for the re-runs, as an operator would
    for _ in range(3):
        statuses = [status for _, status, _ in ledger_rows(output)]
        if statuses and all(status == "succeeded" for status in statuses):
            break
        again = submit(cluster, spec, output, "--rerun", "failed")
        result.submits += 1
        result.tracebacks += again.communicate(timeout=600)[1].count("Traceback (most recent call last)")
    rows = ledger_rows(output)
    ids = [job_id for job_id, _, _ in rows]
    result.duplicated = sorted(job_id for job_id, count in Counter(ids).items() if count > 1)
    result.unfinished = sorted(job_id for job_id, status, _ in rows if status != "succeeded")
    after = succeeded_parameters(output)
    result.lost = sorted(job_id for job_id, values in before.items() if after.get(job_id) != values)
    result.unfinished += sorted(set(baseline) - set(ids))
    for job_id, values in after.items():
        expected = baseline.get(job_id)
        if expected is None or any(
            abs(a - b) > TOLERANCE * max(1.0, abs(b)) for a, b in zip(values, expected)
        ):
            result.mismatched.append(job_id)
    # Ray removes a dead driver's actors and placement groups within seconds.
    settled = wait_until(
        lambda: not cluster.runjobs_actors() and not cluster.runjobs_placement_groups(), 60, 1.0
    )
    if not settled:
        result.leftovers = [
            actor.name for actor in cluster.runjobs_actors()
        ] + cluster.runjobs_placement_groups()
    connection = sqlite3.connect(output / "ledger.sqlite")
    try:
        result.integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()
    result.seconds = time.monotonic() - started
    return result


def summarise(results: list[RoundResult]) -> dict:
    by_kind: dict[str, dict[str, int]] = defaultdict(Counter)
    for result in results:
        counts = by_kind[result.kind]
        counts["rounds"] += 1
        counts["faults injected"] += result.injected
        counts["re-submits"] += result.submits - 1
        counts["results lost"] += len(result.lost)
        counts["jobs unfinished"] += len(result.unfinished)
        counts["results differing"] += len(result.mismatched)
        counts["duplicate records"] += len(result.duplicated)
        counts["leftover actors or groups"] += len(result.leftovers)
        counts["integrity failures"] += result.integrity != "ok"
        counts["tracebacks"] += result.tracebacks
    return {kind: dict(counts) for kind, counts in sorted(by_kind.items())}


def run(rounds: int, seed: int, kinds: tuple[str, ...], scratch: Path, log=print) -> list[RoundResult]:
    rng = random.Random(seed)
    spec = scratch / "chaos.yaml"
    spec.write_text(SWEEP)
    cluster = Cluster(scratch)
    try:
        baseline_dir = scratch / "baseline"
        undisturbed = submit(cluster, spec, baseline_dir)
        stderr = undisturbed.communicate(timeout=900)[1]
        if undisturbed.returncode != 0:
            raise RuntimeError(f"the undisturbed run failed ({undisturbed.returncode}): {stderr[-2000:]}")
        baseline = succeeded_parameters(baseline_dir)
        results = []
        for index in range(rounds):
            kind = kinds[index % len(kinds)] if rounds <= len(kinds) else rng.choice(kinds)
            result = run_round(kind, cluster, spec, scratch / f"round-{index}", baseline, rng)
            results.append(result)
            verdict = "clean" if result.clean else f"BROKEN {vars(result)}"
            log(f"round {index + 1}/{rounds}: {kind}: {verdict} (injected {result.injected}, "
                f"{result.submits} submit(s), {result.seconds:.0f}s)")  # fmt: skip
        return results
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--json", type=Path, help="also write the per-round results here")
    options = parser.parse_args()
    kinds = tuple(kind for kind in options.kinds.split(",") if kind)
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown or not kinds:
        parser.error(f"--kinds {options.kinds}: choose from {', '.join(FAULTS)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="runjobs-chaos-") as scratch:
        results = run(options.rounds, options.seed, kinds, Path(scratch),
                      log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    summary = summarise(results)
    if options.json:
        options.json.write_text(json.dumps([vars(result) for result in results], indent=2))
    columns = ["rounds", "faults injected", "re-submits", "results lost", "jobs unfinished",
               "results differing", "duplicate records", "leftover actors or groups", "integrity failures",
               "tracebacks"]  # fmt: skip
    print(f"Rounds: {len(results)} (seed {options.seed}), {time.monotonic() - started:.0f} s.\n")
    print("| fault | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind, counts in summary.items():
        print(f"| {kind} | " + " | ".join(str(counts.get(column, 0)) for column in columns) + " |")
    sys.exit(0 if all(result.clean for result in results) else 1)


if __name__ == "__main__":
    main()
