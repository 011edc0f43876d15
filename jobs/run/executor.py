"""What an executor is: it runs planned jobs somewhere and hands back one record per job as each ends.

The pipeline (jobs/pipeline.py) is the same for every executor: plan, open the run's
ledger, `executor.connect()`, `session.run(jobs, callbacks)`, report. An executor only
decides where the jobs run:

- jobs/run/ray_cluster.py: a Ray cluster this process drives (an embedded local Ray, or
  one reached by address), with the driver and scheduler here;
- jobs/run/ray_jobs.py: a Ray Job on a cluster's head, whose driver runs there and
  sends each record back;
- jobs/run/in_process.py: every job in this process, one after another, no Ray (tests).

`connect()` is where a cluster is started or reached: it raises before anything is
written (bad input exit 2, unreachable exit 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from jobs.plan.planning import PlannedJob
from jobs.plan.stopping_rule import StoppingRule
from jobs.record.records import JobOutcome


@dataclass
class RunCallbacks:
    """How a session reports back to the pipeline while its jobs run."""

    # A job started (an attempt). `quiet` (the second argument) while an earlier run's
    # log is replayed: keep it, show nothing.
    on_start: Callable[[str, bool], None]
    # A job ended: its whole record, logs and model files beside the results; the
    # pipeline keeps it before the next one. Idempotent: a record handed over twice is kept once.
    on_record: Callable[[JobOutcome, bool], None]
    should_stop: Callable[[], bool]  # `runjobs cancel` asked the run to stop
    say: Callable[[str], None]  # a progress line
    keep_meta: Callable[..., None]  # run-level facts for the ledger (a remote run's Ray job id)
    # Running jobs' latest reported [epoch, loss] under a stopping rule, by job id.
    on_progress: Callable[[dict[str, list[float]]], None] | None = None
    # A remote driver asked its study for a trial (or told one failed): the search's own
    # study does the same, so it stays in step (jobs/pipeline.py, _in_step_with).
    on_trial: Callable[[dict[str, Any]], None] | None = None
    # What a pack's member starts and records are kept inside: one ledger transaction.
    together: Callable[[], AbstractContextManager] = contextlib.nullcontext
    # A pack ended and its members' records are kept: show it once (jobs/plan/packing.py).
    on_pack: Callable[[Any, list[JobOutcome]], None] | None = None


class RunListener(Protocol):
    """Who else hears of each start and each ended job, before it is kept (a remote driver's client)."""

    def started(self, job_id: str) -> None: ...

    def ended(self, outcome: JobOutcome) -> None: ...


class JobFeed(Protocol):
    """Jobs that arrive while a run goes on: an adaptive search asks for its next trials as
    earlier ones end (jobs/plan/optuna_search.py). A session asks `take` whenever it looks
    for work, and runs until it has none and `exhausted` says no more will come."""

    def take(self) -> list[PlannedJob]:
        """The jobs to start now, each resolved and in the ledger; [] while none may start yet.

        While no job of the run is running or queued, `take` answers at least one job or
        `exhausted` is true."""

    def exhausted(self) -> bool:
        """Whether no job will come any more."""

    def remaining(self) -> int:
        """How many jobs may still come (an estimate the warm-worker pool plans with)."""


@dataclass
class RunSummary:
    """What a session tells at its end: the cluster it ran on, the driver's timings, and
    whether it was interrupted (Ctrl-C, SIGTERM, `runjobs cancel`) after handing every
    job back, finished or cancelled."""

    cluster: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: Any = None  # the RunInterrupted (jobs/run/driver.py) that ended the run early


@dataclass
class Detached:
    """A run handed to the cluster without waiting for it (`--no-wait`)."""

    job_id: str
    address: str
    jobs: int


class Session(Protocol):
    """A connected executor."""

    cluster: dict[str, Any]  # the cluster's description, for the ledger and the report

    def resolve(self, job: PlannedJob) -> PlannedJob:
        """The job with what depends on the cluster filled in; refuses a job the cluster cannot hold."""

    def recover(self, meta: dict[str, Any], callbacks: RunCallbacks) -> None:
        """Before jobs are chosen: keep what an earlier run into the same directory finished
        (`meta` is the ledger's); refuse when that run still goes."""

    def run(
        self,
        jobs: list[PlannedJob],
        callbacks: RunCallbacks,
        run_id: str,
        feed: JobFeed | None = None,
        stopping: StoppingRule | None = None,
    ) -> RunSummary | Detached:
        """Run the jobs, and the feed's as they come, calling back as each starts and ends; an
        interrupt ends it early (RunSummary). With `stopping`, single-device jobs report their
        loss as they train and the rule may stop them (jobs/run/stopping.py)."""


class Executor(Protocol):
    def connect(self) -> AbstractContextManager[Session]:
        """Start or reach the place the jobs run, for the duration of the block."""

    def closed(self) -> float | None:
        """After the block: wait until the connection is closed; how long closing took, if measured."""
