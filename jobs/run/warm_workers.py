"""Warm workers: the policy for per-framework workers that run a sweep's single-device CPU jobs.

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

This module is the policy alone and never imports Ray: a worker is a plain number, which
the driver (jobs/run/driver.py) maps to its actor when the scheduler (jobs/run/scheduler.py)
tells it to create one, and ends with ray.kill when the scheduler retires it.

GPU jobs and mirrored jobs never come here: they need a fresh process (see the scheduler).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any


def takes(spec) -> bool:
    """Whether a job runs on a warm worker: a single-device job without GPUs."""
    return spec.variant == "single" and not spec.gpus_per_job


def kind_of(spec) -> str:
    """Which warm workers may run a job: its framework's, and for a user model, those that ran
    the same code (its digest). A user's file runs inside the worker's process and may change
    it (patch a framework, set global state), so another version of it, or another file,
    gets workers of its own."""
    from workers import models

    if models.is_built_in(spec.model):
        return spec.framework
    return f"{spec.framework} {models.read_user_model(spec.model).digest[:16]}"


@dataclass(frozen=True)
class Assignment:
    """A queued job handed to a warm worker: an idle one, or a new one the driver must create first."""

    job: Any
    attempt: int
    worker: int
    new_worker: bool


class WarmWorkerPool:
    """Which warm workers live, which are idle, and which of them takes which queued job."""

    def __init__(self) -> None:
        self.pending: dict[str, deque[tuple[Any, int]]] = defaultdict(deque)  # framework -> (job, attempt)
        self.idle: dict[str, list[int]] = defaultdict(list)
        self.live: Counter[str] = Counter()  # framework -> its workers, busy or idle
        self.framework_of: dict[int, str] = {}  # every live worker, busy or idle
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

    def has_pending(self) -> bool:
        return any(self.pending.values())

    def drop_pending(self) -> None:
        """Forget every queued job: the run was cancelled and they are recorded so."""
        self.pending.clear()

    def retire_unneeded(self, capacity: int, more_to_come: int = 0) -> list[int]:
        """End idle workers with nothing to run, and idle ones beyond capacity (other jobs wait for CPUs).

        `more_to_come`: jobs a search may still ask for. Its trials come one or two
        at a time, so an idle worker is kept for the next one (retiring it would pay a new
        worker's import for nearly every trial) unless a job of another kind waits for its CPU.
        Returns the workers ended, for the driver to stop.
        """
        retired = []
        if more_to_come:
            # Only a framework with no worker at all takes another's idle CPU: a job whose own
            # worker is busy waits for it (a moment), and taking CPUs back and forth between
            # the frameworks would pay an import for every few trials.
            starved = sum(len(queue) for name, queue in self.pending.items() if queue and not self.live[name])
            for framework, workers in self.idle.items():
                while (
                    workers
                    and starved
                    and not self.pending[framework]
                    and sum(self.live.values()) >= capacity
                ):
                    retired.append(self._end(workers.pop()))
                    starved -= 1
        for framework, workers in self.idle.items():
            if not self.pending[framework] and not more_to_come:
                while workers:
                    retired.append(self._end(workers.pop()))
        for workers in self.idle.values():
            while workers and sum(self.live.values()) > capacity:
                retired.append(self._end(workers.pop()))
        return retired

    def assign(self, capacity: int, slots: int | None, more_to_come: int = 0) -> list[Assignment]:
        """The queued jobs to start now: on idle workers first, then on new ones up to capacity.

        `slots` caps how many start (None: no cap, as without --max-concurrent);
        `more_to_come` counts jobs a search may still ask for (see _worth_adding).
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
                waiting = [name for name, queue in self.pending.items() if queue and self._worth_adding(name)]
                if not waiting or sum(self.live.values()) >= capacity:
                    break
                # A new worker for the framework with the most pending jobs per worker, so
                # a two-framework sweep on two CPUs gets one worker of each.
                framework = max(waiting, key=lambda name: len(self.pending[name]) / (self.live[name] + 1))
                worker = next(self.worker_numbers)
                self.framework_of[worker] = framework
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

    def give_back(self, worker: int) -> None:
        """A worker whose job succeeded: keep it warm for the next job of its framework."""
        self.idle[self.framework_of[worker]].append(worker)

    def replace(self, worker: int) -> None:
        """A worker whose job failed, timed out or was cancelled: end it; a fresh one takes its place."""
        self._end(worker)

    def _end(self, worker: int) -> int:
        framework = self.framework_of.pop(worker)
        self.live[framework] -= 1
        return worker
