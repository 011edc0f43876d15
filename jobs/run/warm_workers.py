"""Warm workers: the policy for per-framework workers that run a sweep's single-device jobs.

Importing TensorFlow or torch and starting its runtime costs seconds, training the
article's model a fraction of one. A warm worker is an actor that imports one framework
with its first job and then runs that framework's jobs one after another, so a sweep
pays each import once per worker rather than once per job, and a worker never holds both
frameworks. The pool keeps at most one worker per CPU of the cluster, splits new workers
between the frameworks by their pending jobs, adds a framework's workers after the first
fan-out only while the work waiting for them outlasts a worker's measured start-up,
retires a framework's idle workers once it has nothing left to run (their CPUs go to the
other framework or to gang jobs), and replaces a worker whose job failed or who died: a
job that wrecked its process must not poison the next one.

A GPU job runs on a warm worker too: one that holds the job's GPU share for its life, so
a sweep of small GPU jobs pays the import and the CUDA start once per worker (ray#20563).
Workers of different GPU shares are different kinds, and the pool never holds more GPUs
than the cluster has. After each job the worker reports its device: one that failed a
check, or whose framework holds more device memory than MEMORY_BOUND_FRACTION of its share
(TensorFlow never gives back what its allocator grew to), is replaced.

On a cluster runjobs did not start, workers outlive the run (jobs/run/warm_pool.py): the
next run adopts idle ones of the kinds it has jobs queued for (`adopt`), keeps idle
workers with nothing to run (`keeps_idle`) while none of its jobs is queued, and gives
them back at its end.

This module is the policy alone and never imports Ray: a worker is a plain number, which
the driver (jobs/run/driver.py) maps to its actor when the scheduler (jobs/run/scheduler.py)
tells it to create one, and ends with ray.kill when the scheduler retires it.

Mirrored jobs never come here: TensorFlow fixes a process's logical devices when its
runtime starts, so each needs a fresh process (see the scheduler).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any

# A warm GPU worker whose framework holds more than this share of its GPU share's memory
# after a job is replaced: the next job might not fit beside what it keeps.
MEMORY_BOUND_FRACTION = 0.5


def takes(spec) -> bool:
    """Whether a job runs on a warm worker: a single-device job, on a CPU or its GPU share."""
    return spec.variant == "single"


def kind_of(spec) -> str:
    """Which warm workers may run a job: its framework's with the same GPU share, and for a
    user model, those that ran the same code (its digest). A user's file runs inside the
    worker's process and may change it (patch a framework, set global state), so another
    version of it, or another file, gets workers of its own."""
    from workers import models

    kind = spec.framework
    if spec.gpus_per_job:
        kind += f" gpu{spec.gpus_per_job:g}"
    if not models.is_built_in(spec.model):
        kind += f" {models.read_user_model(spec.model).digest[:16]}"
    return kind


def gpus_of(kind: str) -> float:
    """The GPU share a worker of `kind` holds (kind_of writes it as `gpuN`)."""
    for part in kind.split()[1:]:
        if part.startswith("gpu"):
            return float(part[3:])
    return 0.0


def needs_replacing(worker_report: dict[str, Any] | None, gpus: float) -> str | None:
    """Why a warm worker must not take another job after this one (None: it may).

    `worker_report` is what the worker said of its device after the job
    (workers/worker_actor.py): whether the device passed its check, and the device memory
    its framework still holds.
    """
    if not worker_report:
        return None
    if worker_report.get("device_ok") is False:
        return f"its device failed a check ({worker_report.get('device_error', 'no detail')})"
    memory = worker_report.get("device_memory") or {}
    in_use, total = memory.get("in_use"), memory.get("total")
    if in_use is None or not total or not gpus:
        return None
    bound = MEMORY_BOUND_FRACTION * min(gpus, 1.0) * total
    if in_use > bound:
        return f"its framework holds {in_use / 2**20:.0f} MiB of device memory, above {bound / 2**20:.0f} MiB"
    return None


@dataclass(frozen=True)
class Assignment:
    """A queued job handed to a warm worker: an idle one, or a new one the driver must create first."""

    job: Any
    attempt: int
    worker: int
    new_worker: bool


class WarmWorkerPool:
    """Which warm workers live, which are idle, and which of them takes which queued job."""

    def __init__(self, keeps_idle: bool = False) -> None:
        # Workers that outlive the run (jobs/run/warm_pool.py): an idle one is kept for the
        # next run rather than ended, unless a waiting job needs what it holds.
        self.keeps_idle = keeps_idle
        self.pending: dict[str, deque[tuple[Any, int]]] = defaultdict(deque)  # framework -> (job, attempt)
        self.idle: dict[str, list[int]] = defaultdict(list)
        self.live: Counter[str] = Counter()  # framework -> its workers, busy or idle
        self.kind_of_worker: dict[int, str] = {}  # every live worker (busy or idle) -> its kind
        self.worker_numbers = itertools.count(1)
        # Measured per framework: a new worker's start-up (import, runtime) and a warm job's time.
        self.startup_s: dict[str, float] = {}
        self.job_s: dict[str, float] = {}
        self.added: Counter[str] = Counter()  # jobs queued so far per framework: its share of a search
        self.more_to_come = 0  # jobs a search may still ask for (set by each `assign`)

    def add(self, job, attempt: int = 1) -> None:
        """Queue a job; a retried job goes to the front of its framework's queue."""
        kind = kind_of(job.spec)
        queue = self.pending[kind]
        if attempt == 1:
            self.added[kind] += 1
        if attempt > 1:
            queue.appendleft((job, attempt))
        else:
            queue.append((job, attempt))

    def adopt(self, kind: str) -> int:
        """An idle worker of `kind` that an earlier run left warm; its number."""
        worker = next(self.worker_numbers)
        self.kind_of_worker[worker] = kind
        self.live[kind] += 1
        self.idle[kind].append(worker)
        return worker

    def idle_workers(self) -> list[int]:
        return [worker for workers in self.idle.values() for worker in workers]

    def gpus_held(self) -> float:
        return sum(gpus_of(kind) * count for kind, count in self.live.items())

    def has_pending(self) -> bool:
        return any(self.pending.values())

    def drop_pending(self) -> None:
        """Forget every queued job: the run was cancelled and they are recorded so."""
        self.pending.clear()

    def retire_unneeded(
        self, capacity: int, more_to_come: int = 0, room: int | None = None, gpu_capacity: float = 0.0
    ) -> list[int]:
        """End idle workers with nothing to run, and idle ones beyond capacity (other jobs wait for CPUs).

        `more_to_come`: jobs a search may still ask for. Its trials come one or two
        at a time, so an idle worker is kept for the next one (retiring it would pay a new
        worker's import for nearly every trial) unless a job of another kind waits for its CPU.
        A pool that `keeps_idle` keeps them the same way, for the next run. `room`: the CPUs
        the pool may hold while jobs outside it wait (capacity without its floor of one);
        `gpu_capacity`: the GPUs it may hold. Returns the workers ended, for the driver to stop.
        """
        retired = []
        # A kept pool keeps idle workers for the next run only while nothing of this run
        # waits: a queued job of another kind may need the CPU, and a worker still waiting
        # for one counts as live (two runs each holding the other's CPU would wait forever).
        keeping = bool(more_to_come) or (self.keeps_idle and not self.has_pending())
        if keeping:
            # Only a kind with no worker at all takes another's idle CPU or GPU: a job whose
            # own worker is busy waits for it (a moment), and taking CPUs back and forth
            # between the kinds would pay an import for every few trials.
            for kind, queue in list(self.pending.items()):
                if not queue or self.live[kind]:
                    continue
                while not self._fits(kind, capacity, gpu_capacity):
                    # Short of a CPU, any idle worker frees one; short of GPUs only, one holding a GPU.
                    short_of_cpus = sum(self.live.values()) >= capacity
                    victim = self._idle_without_work(needs_gpus=not short_of_cpus)
                    if victim is None:
                        break
                    retired.append(victim)
        for kind, workers in self.idle.items():
            if not self.pending[kind] and not keeping:
                while workers:
                    retired.append(self._end(workers.pop()))
        if room is not None:
            # Jobs outside the pool (a gang, a mirrored job) wait for CPUs: an idle worker
            # with nothing to run gives its CPU back.
            while sum(self.live.values()) > room:
                victim = self._idle_without_work(needs_gpus=False)
                if victim is None:
                    break
                retired.append(victim)
        for workers in self.idle.values():
            while workers and sum(self.live.values()) > capacity:
                retired.append(self._end(workers.pop()))
        return retired

    def _idle_without_work(self, needs_gpus: bool) -> int | None:
        """End an idle worker of a kind with nothing queued (one holding a GPU when GPUs are short)."""
        for kind, workers in list(self.idle.items()):
            if workers and not self.pending.get(kind) and (gpus_of(kind) > 0 or not needs_gpus):
                return self._end(workers.pop())
        return None

    def _fits(self, kind: str, capacity: int, gpu_capacity: float) -> bool:
        """Whether a new worker of `kind` fits beside the live ones: a CPU, and its GPU share."""
        if sum(self.live.values()) >= capacity:
            return False
        gpus = gpus_of(kind)
        return not gpus or self.gpus_held() + gpus <= gpu_capacity + 1e-9

    def assign(
        self, capacity: int, slots: int | None, more_to_come: int = 0, gpu_capacity: float = 0.0
    ) -> list[Assignment]:
        """The queued jobs to start now: on idle workers first, then on new ones up to capacity.

        `slots` caps how many start (None: no cap, as without --max-concurrent);
        `more_to_come` counts jobs a search may still ask for (see _worth_adding);
        `gpu_capacity` caps the GPUs the pool's workers hold together.
        """
        self.more_to_come = more_to_come
        assignments: list[Assignment] = []
        while slots is None or len(assignments) < slots:
            framework = next(
                (name for name, workers in self.idle.items() if workers and self.pending[name]), None
            )
            if framework is not None:
                worker = self.idle[framework].pop()
                new_worker = False
            else:
                waiting = [
                    name
                    for name, queue in self.pending.items()
                    if queue and self._worth_adding(name) and self._fits(name, capacity, gpu_capacity)
                ]
                if not waiting:
                    break
                # A new worker for the framework with the most pending jobs per worker, so
                # a two-framework sweep on two CPUs gets one worker of each.
                framework = max(waiting, key=lambda name: len(self.pending[name]) / (self.live[name] + 1))
                worker = next(self.worker_numbers)
                self.kind_of_worker[worker] = framework
                self.live[framework] += 1
                new_worker = True
            job, attempt = self.pending[framework].popleft()
            assignments.append(Assignment(job, attempt, worker, new_worker))
        return assignments

    def observe(self, framework: str, timings: dict[str, float]) -> None:
        """Learn from a succeeded job how long a worker takes to start and a job to run."""
        startup = timings.get("startup_s") or 0.0
        self.startup_s[framework] = max(self.startup_s.get(framework, 0.0), startup)
        work = sum(timings.get(key) or 0.0 for key in ("setup_s", "train_s", "predict_s"))
        previous = self.job_s.get(framework)
        self.job_s[framework] = work if previous is None else 0.8 * previous + 0.2 * work

    def _worth_adding(self, framework: str) -> bool:
        """A framework's first worker always; another while its queue outlasts a worker's start-up.

        Until the first job ends, workers start as capacity allows, so on a large node the
        imports run in parallel. After that a framework gets another worker only once its
        own jobs are measured: a new worker's import (seconds) would otherwise often cost
        more than the few warm jobs (a tenth of a second each) it takes over.
        """
        if self.live[framework] == 0 or not self.job_s:
            return True
        if framework not in self.job_s:
            return False
        queued = len(self.pending[framework])
        if self.more_to_come:
            # A search's trials arrive as earlier ones end: count those still to come at
            # this framework's share of the trials so far.
            queued += self.more_to_come * self.added[framework] / max(sum(self.added.values()), 1)
        queued_work_per_worker = queued * self.job_s[framework] / self.live[framework]
        return queued_work_per_worker > self.startup_s.get(framework, 0.0)

    def give_back(self, worker: int, worker_report: dict[str, Any] | None = None) -> bool:
        """A worker whose job succeeded: kept warm for the next job of its kind, unless its device
        says otherwise (needs_replacing); whether it was kept."""
        kind = self.kind_of_worker[worker]
        if needs_replacing(worker_report, gpus_of(kind)) is not None:
            self._end(worker)
            return False
        self.idle[kind].append(worker)
        return True

    def replace(self, worker: int) -> None:
        """A worker whose job failed, timed out or was cancelled: end it; a fresh one takes its place."""
        self._end(worker)

    def _end(self, worker: int) -> int:
        framework = self.kind_of_worker.pop(worker)
        self.live[framework] -= 1
        return worker
