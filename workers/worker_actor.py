"""The Ray actors that run jobs: a gang worker of a multiworker or ddp job, and a warm worker.

A gang worker: the driver starts one per worker inside the job's placement group, asks
each for an address its peers can reach, then hands every worker its `WorkerContext` and
the job. A warm worker: one framework (and one GPU share), many single-device jobs in turn.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray

from workers.data import Dataset
from workers.devices import device_memory, ray_gpu_ids, release_device
from workers.distributed import WorkerContext, reserve_address
from workers.entry import run_job
from workers.packed import TrainingPack, run_pack
from workers.reporting import TrainingMonitor

# A warm worker kept between runs (jobs/run/warm_pool.py) answers its lease questions in a
# group of its own, so `runjobs pool status` and the next submit's claim get an answer
# while a job trains.
CONTROL = "control"


class DistributedWorker:
    def address(self) -> str:
        return reserve_address()

    def run(
        self,
        spec,
        dataset: Dataset,
        submitted_at: float,
        context: WorkerContext,
        monitor: TrainingMonitor | None = None,
    ) -> dict[str, Any]:
        return run_job(spec, dataset, submitted_at, context, monitor=monitor)


@ray.remote(concurrency_groups={CONTROL: 1})
class WarmWorker:
    """A process that keeps one framework imported and runs that framework's jobs one after another.

    The driver gives it single-device jobs of one kind (framework, GPU share, user model
    code: jobs/run/warm_workers.py, kind_of), so the framework's import, its runtime and
    its device are set up once per worker rather than once per job. The first job's
    start-up includes them; the later jobs' start-up is near zero.

    A worker kept between runs (a detached actor in runjobs' namespace) is leased: the
    driver that holds it renews its lease while the run goes on and gives it back with
    an idle time. A lease that runs out (its driver died) gives it back too. An idle,
    unleased worker ends itself when its idle time is over. A worker of one run only
    (embedded Ray, --keep-warm 0) is never leased and ends with its run.
    """

    def __init__(self, description: dict[str, Any] | None = None) -> None:
        self.description = dict(description or {})
        self.lock = threading.Lock()
        self.owner: str | None = None  # the run that holds the lease
        self.lease_until = 0.0
        self.keep_s = 0.0  # idle time once given back
        self.idle_until: float | None = None  # when an unleased worker ends itself; None: never
        self.busy = False
        self.ending = False
        self.jobs = 0
        self.created_at = time.time()
        self.last_job_ended_at: float | None = None
        if self.description.get("owner"):
            self._lease(self.description["owner"], self.description["lease_s"], self.description["keep_s"])
            threading.Thread(target=self._end_when_idle, name="runjobs-idle-timer", daemon=True).start()

    def run(
        self, spec, dataset: Dataset, submitted_at: float, monitor: TrainingMonitor | None = None
    ) -> dict[str, Any]:
        with self.lock:
            self.busy = True
        try:
            if isinstance(spec, TrainingPack):
                result = run_pack(spec, dataset, submitted_at)
            else:
                result = run_job(spec, dataset, submitted_at, monitor=monitor)
            # What the next job inherits: the device's memory after this one let go of
            # what the framework allows. The pool replaces a worker past its bound.
            health = release_device(spec.framework)
            result["placement"]["worker"] = {
                "process": "warm",
                "jobs_before": self.jobs,
                "device_memory": device_memory(spec.framework),
                **health,
            }
            return result
        finally:
            with self.lock:
                self.busy = False
                self.jobs += 1
                self.last_job_ended_at = time.time()
                if self.owner is not None:
                    self.lease_until = max(self.lease_until, time.time() + self.description.get("lease_s", 0))

    # The lease, in the control group: answered while a job trains.

    @ray.method(concurrency_group=CONTROL)
    def claim(self, owner: str, lease_s: float, keep_s: float) -> dict[str, Any] | None:
        """Lease this worker to `owner` when nobody holds it; its description, or None when taken."""
        with self.lock:
            self._expire_lease()
            if self.ending or self.owner is not None:
                return None
            self._lease(owner, lease_s, keep_s)
            return self._describe()

    @ray.method(concurrency_group=CONTROL)
    def renew(self, owner: str, lease_s: float) -> bool:
        with self.lock:
            if self.owner != owner:
                return False
            self.lease_until = max(self.lease_until, time.time() + lease_s)
            return True

    @ray.method(concurrency_group=CONTROL)
    def give_back(self, owner: str, keep_s: float) -> bool:
        """The run is over: idle for `keep_s`, then end; another run may lease it meanwhile."""
        with self.lock:
            if self.owner != owner:
                return False
            self.owner = None
            self.keep_s = keep_s
            # `runjobs pool stop` came while the run held it: it ends now.
            self.idle_until = time.time() + (0.0 if self.ending else keep_s)
            return True

    @ray.method(concurrency_group=CONTROL)
    def end_unless_leased(self) -> bool:
        """For `runjobs pool stop`: refuse every later claim and say whether it may be killed now
        (False: a run holds it, and it ends when that run gives it back)."""
        with self.lock:
            self._expire_lease()
            self.ending = True
            if self.owner is not None:
                self.idle_until = time.time()  # ends once given back or once its lease runs out
                return False
            return True  # idle, or busy for a driver that is gone

    @ray.method(concurrency_group=CONTROL)
    def describe(self) -> dict[str, Any]:
        with self.lock:
            self._expire_lease()
            return self._describe()

    # Inside the worker.

    def _lease(self, owner: str, lease_s: float, keep_s: float) -> None:
        self.owner = owner
        self.lease_until = time.time() + lease_s
        self.keep_s = keep_s
        self.idle_until = None

    def _expire_lease(self) -> None:
        """A lease its run stopped renewing (the driver died): given back, idle from when it ran out.

        The driver renews from a thread of its own, busy workers too, so a busy worker whose
        lease ran out belongs to a driver that is gone: nothing will read its job's result,
        and it ends rather than train on (a hung job would hold its CPU or GPU for ever).
        """
        if self.owner is None or time.time() <= self.lease_until:
            return
        self.owner = None
        if self.busy or self.ending:
            self.ending = True
            self.idle_until = time.time()
        else:
            self.idle_until = self.lease_until + self.keep_s

    def _describe(self) -> dict[str, Any]:
        now = time.time()
        idle_since = self.last_job_ended_at or self.created_at
        return {
            **{key: value for key, value in self.description.items() if key != "owner"},
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": list(ray_gpu_ids()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "state": "busy" if self.busy else ("leased" if self.owner is not None else "idle"),
            "owner": self.owner,
            "jobs": self.jobs,
            "idle_s": 0.0 if self.busy else max(now - idle_since, 0.0),
            "ends_in_s": None if self.idle_until is None else max(self.idle_until - now, 0.0),
            "ending": self.ending,
        }

    def _end_when_idle(self) -> None:
        """Wake every second; end this actor once it is unleased, idle and past its idle time."""
        while True:
            time.sleep(1.0)
            with self.lock:
                self._expire_lease()
                due = (
                    self.owner is None
                    and (not self.busy or self.ending)
                    and self.idle_until is not None
                    and time.time() >= self.idle_until
                )
                if due:
                    self.ending = True
            if due:
                try:
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                except Exception:  # Ray could not end it: the process ends itself
                    os._exit(0)
                return
