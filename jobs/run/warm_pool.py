"""Warm workers that outlive a run: kept on a cluster runjobs did not start, for the next submit.

On a running cluster (`ray start`, `ray up`) people submit, read the report, change one
field and submit again; each submit used to import TensorFlow and torch again in new
workers. Here a run's warm workers are detached actors in runjobs' own Ray namespace,
named `runjobs:warm:KIND:CODE:...`, and the next run, from any client with the same
runjobs version and code, adopts the idle ones of its kinds (the kind carries the user
model file's digest, so a changed model file never runs old code either).

The actors keep their own lease (workers/worker_actor.py): a run that adopts or creates
one holds it, renews it while it goes on (a driver that dies stops renewing, and the lease
runs out after LEASE_S) and gives it back at its end with an idle time, `--keep-warm`: ten
minutes for CPU workers by default, none for GPU workers unless given (an idle GPU worker
keeps an autoscaled GPU node, and its bill, alive). An unleased worker ends itself when
its idle time is over. A worker of another code version is never adopted; a run whose
jobs wait for CPUs ends such idle workers, as the scheduler ends idle ones of its own.

Embedded runs, and a caller's own Ray connection (tests, notebooks), keep nothing: their
workers end with the run. `runjobs pool status` and `runjobs pool stop` read and end the
pool (`describe`, `stop`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from jobs.plan.keep_warm import KeepWarm

NAMESPACE = "runjobs"
NAME_PREFIX = "runjobs:warm:"
# A run renews its workers' leases every RENEW_S; a lease not renewed for LEASE_S (its
# driver died) runs out, and the worker is idle from then on.
LEASE_S = 20.0
RENEW_S = 5.0
# How often a run looks for pool workers it does not hold (given back by another run,
# or whose lease ran out) while it has jobs waiting.
SCAN_S = 2.0
# Ray answers a live actor within milliseconds; one that does not answer in this long is
# busy dying or on a lost node, and is left alone.
ANSWER_TIMEOUT_S = 5.0


@cache
def code_version() -> str:
    """runjobs' version and a digest of its source: workers kept by another checkout are never used.

    The digest covers every .py file of the control and data planes as this process sees
    them, so an edit, a pull or another install gives new workers (whose processes import
    the code anew) rather than workers that imported the old one.
    """
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in ("jobs", "workers"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    try:
        version = importlib.metadata.version("runjobs")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+{digest.hexdigest()[:12]}"


def worker_name(kind: str) -> str:
    """A kept worker's actor name: its kind (spaces as dashes), its code version, a unique tail."""
    return f"{NAME_PREFIX}{kind.replace(' ', '-')}:{code_version()}:{uuid.uuid4().hex[:8]}"


def _pool_names() -> list[str]:
    import ray

    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor.get("namespace") == NAMESPACE and actor.get("name", "").startswith(NAME_PREFIX)
    ]


def _handles(names: list[str]) -> dict[str, Any]:
    import ray

    handles = {}
    for name in names:
        try:
            handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # ended between the listing and now
            continue
    return handles


def _answers(calls: dict[str, Any]) -> dict[str, Any]:
    """Each name's answer, leaving out actors that died or did not answer in time."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    answers = {}
    ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=ANSWER_TIMEOUT_S)
    ready_set = set(ready)
    for name, reference in calls.items():
        if reference not in ready_set:
            continue
        try:
            answers[name] = ray.get(reference)
        except (RayError, GetTimeoutError):
            continue
    return answers


class PoolLease:
    """A run's hold on the cluster's warm pool: adopts kept workers, creates kept ones, gives them back."""

    def __init__(self, keep_warm: KeepWarm) -> None:
        self.keep_warm = keep_warm
        self.owner = f"run-{uuid.uuid4().hex[:12]}"
        self.held: set[str] = set()  # names of the kept workers this run holds
        self.next_renewal = 0.0
        self.next_scan = 0.0

    def adopt(self) -> list[tuple[str, Any]]:
        """Lease every idle kept worker of this code version: (kind, actor) of each.

        Workers of another code version are left to their idle time; `reclaim` ends them
        when this run's jobs wait for what they hold. One another run holds answers no.
        """
        current = code_version()
        candidates = _handles(
            [name for name in _pool_names() if name not in self.held and _code_of(name) == current]
        )
        claims = _answers(
            {
                name: actor.claim.remote(self.owner, LEASE_S, self.keep_for(_kind_of(name)))
                for name, actor in candidates.items()
            }
        )
        adopted = []
        for name, description in claims.items():
            if description is not None:
                self.held.add(name)
                adopted.append((description["kind"], candidates[name]))
        return adopted

    def create(self, worker_class, kind: str, gpus: float) -> Any:
        """A new warm worker this run holds: detached, and leased to this run, when its kind is kept."""
        keep_s = self.keep_for(kind)
        description = {"kind": kind, "code": code_version()}
        if keep_s <= 0:
            name = f"{NAME_PREFIX}{kind.replace(' ', '-')}:{uuid.uuid4().hex[:8]}"
            return worker_class.options(name=name, num_cpus=1, num_gpus=gpus, max_restarts=0).remote(
                description
            )
        name = worker_name(kind)
        self.held.add(name)
        return worker_class.options(
            name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=1, num_gpus=gpus, max_restarts=0
        ).remote({**description, "owner": self.owner, "lease_s": LEASE_S, "keep_s": keep_s})

    def renew(self, actors: list[Any]) -> None:
        """At most every RENEW_S: tell each kept worker this run still holds it (answers not awaited)."""
        now = time.monotonic()
        if now < self.next_renewal:
            return
        self.next_renewal = now + RENEW_S
        for actor in actors:
            actor.renew.remote(self.owner, LEASE_S)

    def reclaim(self, now: bool = False) -> list[tuple[str, Any]]:
        """While jobs wait (at most every SCAN_S, or `now`): end idle workers of another code
        version when the cluster has no CPU free, and adopt workers given back since (or
        whose lease ran out). The driver asks before it creates a worker and while a job
        waits for one: Ray would otherwise hold the new worker until the idle ones' time is up."""
        moment = time.monotonic()
        if not now and moment < self.next_scan:
            return []
        self.next_scan = moment + SCAN_S
        import ray

        if ray.available_resources().get("CPU", 0.0) < 1.0:
            _end_unless_leased([name for name in _pool_names() if _code_of(name) != code_version()])
        return self.adopt()

    def give_back(self, actors: dict[Any, str]) -> None:
        """The run is over: each worker (actor -> kind) idles for its kind's --keep-warm, or ends now."""
        import ray

        kept = {actor: kind for actor, kind in actors.items() if self.keep_for(kind) > 0}
        for actor in actors.keys() - kept.keys():
            ray.kill(actor, no_restart=True)
        _answers(
            {
                str(index): actor.give_back.remote(self.owner, self.keep_for(kind))
                for index, (actor, kind) in enumerate(kept.items())
            }
        )

    def keep_for(self, kind: str) -> float:
        from jobs.run.warm_workers import gpus_of

        return self.keep_warm.for_kind(gpus_of(kind))


def _code_of(name: str) -> str | None:
    """The code version in a kept worker's name (worker_name), or None for a name of another form."""
    parts = name.removeprefix(NAME_PREFIX).split(":")
    return parts[1] if len(parts) == 3 else None


def _kind_of(name: str) -> str:
    return name.removeprefix(NAME_PREFIX).split(":")[0].replace("-", " ")


def _end_unless_leased(names: list[str]) -> dict[str, bool]:
    """End each named worker no run holds; one a run holds ends when given back. Name -> ended now."""
    import ray

    handles = _handles(names)
    answers = _answers({name: actor.end_unless_leased.remote() for name, actor in handles.items()})
    for name, free in answers.items():
        if free:
            ray.kill(handles[name], no_restart=True)
    return answers


def describe() -> list[dict[str, Any]]:
    """Every kept worker on the connected cluster, as it describes itself (`runjobs pool status`)."""
    handles = _handles(_pool_names())
    answers = _answers({name: actor.describe.remote() for name, actor in handles.items()})
    current = code_version()
    rows = []
    for name in sorted(handles):
        description = answers.get(name)
        if description is None:
            rows.append({"name": name, "state": "not answering"})
            continue
        rows.append({"name": name, **description, "current_code": description.get("code") == current})
    return rows


def stop() -> dict[str, int]:
    """End every kept worker no run holds now; those a run holds end when it gives them back."""
    answers = _end_unless_leased(_pool_names())
    ended = sum(1 for free in answers.values() if free)
    return {"ended": ended, "ending_after_their_run": len(answers) - ended}
