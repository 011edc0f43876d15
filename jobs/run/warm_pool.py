"""Warm workers that outlive a run: kept on a cluster runjobs did not start, for the next submit.

On a running cluster (`ray start`, `ray up`) people submit, read the report, change one
field and submit again; each submit used to import TensorFlow and torch again in new
workers. Here a run's warm workers are detached actors in runjobs' own Ray namespace,
named `runjobs:warm:KIND:CODE:...`, and the next run, from any client with the same
runjobs version and code, adopts the idle ones of its kinds (the kind carries the user
model file's digest, so a changed model file never runs old code either).

The actors keep their own lease (workers/worker_actor.py): a run that adopts or creates
one holds it, renews it from a thread while it goes on (a driver that dies stops
renewing, and the lease runs out after LEASE_S: an idle worker is free again, a busy one
ends) and gives it back at its end with an idle time, `--keep-warm`: ten
minutes for CPU workers by default, none for GPU workers unless given (an idle GPU worker
keeps an autoscaled GPU node, and its bill, alive). An unleased worker ends itself when
its idle time is over. A worker of another code version is never adopted; a run whose
jobs wait while no CPU (or GPU) is free ends such idle workers, and those of kinds it has
nothing queued for, as the scheduler ends idle ones of its own.

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
from jobs.run.warm_workers import gpus_of

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
# still being created (waiting for a CPU), dying or on a lost node, and is left alone.
ANSWER_TIMEOUT_S = 1.0
# The most bundles a run asks an autoscaler for at once (GPU jobs waiting for devices).
MAX_REQUESTED_BUNDLES = 64


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
    """A kept worker's actor name: its kind (spaces as underscores), its code version, a unique tail."""
    return f"{NAME_PREFIX}{kind.replace(' ', '_')}:{code_version()}:{uuid.uuid4().hex[:8]}"


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
        self.next_scan = time.monotonic() + SCAN_S  # the run adopts at its start
        self.requested: list[dict[str, float]] = []  # bundles asked of an autoscaler
        self.renewer = None
        self.stopped = None

    def adopt(self, wanted: dict[str, int]) -> list[tuple[str, Any]]:
        """Lease idle kept workers of this code version for the kinds this run has jobs queued for,
        at most `wanted[kind]` of each: (kind, actor) of each one leased.

        Other kinds' workers stay in the pool for other runs, other code versions' for their
        idle time; `reclaim` ends them when this run's jobs wait for what they hold. A worker
        another run holds answers no.
        """
        current = code_version()
        names: list[str] = []
        taken: dict[str, int] = {}
        for name in _pool_names():
            kind = _kind_of(name)
            if name in self.held or _code_of(name) != current or taken.get(kind, 0) >= wanted.get(kind, 0):
                continue
            taken[kind] = taken.get(kind, 0) + 1
            names.append(name)
        candidates = _handles(names)
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
            name = f"{NAME_PREFIX}{kind.replace(' ', '_')}:{uuid.uuid4().hex[:8]}"
            return worker_class.options(name=name, num_cpus=1, num_gpus=gpus, max_restarts=0).remote(
                description
            )
        name = worker_name(kind)
        self.held.add(name)
        return worker_class.options(
            name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=1, num_gpus=gpus, max_restarts=0
        ).remote({**description, "owner": self.owner, "lease_s": LEASE_S, "keep_s": keep_s})

    def reclaim(self, wanted: dict[str, int]) -> list[tuple[str, Any]]:
        """While this run's jobs wait (at most every SCAN_S): when the cluster has no CPU, or
        no GPU, free, end the idle kept workers this run cannot use (another code version's,
        or of a kind it has nothing queued for): Ray would otherwise hold its new workers and
        gangs until their idle time is up. Then adopt workers given back since (or whose
        lease ran out) for the kinds in `wanted`."""
        moment = time.monotonic()
        if moment < self.next_scan:
            return []
        self.next_scan = moment + SCAN_S
        import ray

        free = ray.available_resources()
        short_of_gpus = any(gpus_of(kind) for kind in wanted) and free.get("GPU", 0.0) < min(
            (gpus_of(kind) for kind in wanted if gpus_of(kind)), default=1.0
        )
        if free.get("CPU", 0.0) < 1.0 or short_of_gpus:
            _end_unless_leased(
                [
                    name
                    for name in _pool_names()
                    if name not in self.held
                    and (_code_of(name) != code_version() or _kind_of(name) not in wanted)
                ]
            )
        return self.adopt(wanted)

    def request_devices(self, bundles: list[dict[str, float]]) -> None:
        """Ask an autoscaler for room for these worker bundles (GPU jobs waiting for devices).

        A warm worker is created only where the cluster has room, so without this the GPU
        jobs queued behind the pool would never show Ray demand and an autoscaled GPU
        cluster would not grow. A cluster without an autoscaler ignores the request.
        """
        bundles = bundles[:MAX_REQUESTED_BUNDLES]
        if bundles == self.requested:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
            self.requested = bundles
        except Exception:  # no autoscaler API here: the pool grows with the cluster as it is
            self.requested = bundles

    def start_renewing(self, actors) -> None:
        """Renew the leases of `actors()` every RENEW_S on a thread, busy workers too, until
        `stop_renewing`: a driver busy elsewhere (a slow tracker, a long report) never loses them."""
        import threading

        def renew() -> None:
            import ray

            while not self.stopped.wait(RENEW_S):
                answers = []
                for actor in actors():
                    try:
                        answers.append(actor.renew.remote(self.owner, LEASE_S))
                    except Exception:  # a worker ending now; its run learns of it from Ray
                        continue
                # Read every answer: a worker that died meanwhile answers with an error, which
                # Ray would otherwise print as unhandled once the reference is dropped.
                for answer in answers:
                    try:
                        ray.get(answer, timeout=ANSWER_TIMEOUT_S)
                    except Exception:
                        continue

        self.stopped = threading.Event()
        self.renewer = threading.Thread(target=renew, name="runjobs-warm-pool-leases", daemon=True)
        self.renewer.start()

    def stop_renewing(self) -> None:
        if self.renewer is not None:
            self.stopped.set()
            self.renewer.join()
            self.renewer = None
        if self.requested:
            self.request_devices([])

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
        return self.keep_warm.for_kind(gpus_of(kind))


def _code_of(name: str) -> str | None:
    """The code version in a kept worker's name (worker_name), or None for a name of another form."""
    parts = name.removeprefix(NAME_PREFIX).split(":")
    return parts[1] if len(parts) == 3 else None


def _kind_of(name: str) -> str:
    return name.removeprefix(NAME_PREFIX).split(":")[0].replace("_", " ")


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
