"""The scheduling policy: which job starts next and where, retries, deadlines and cancel, without Ray.

The driver (jobs/run/driver.py) is the Ray layer. It tells the `Scheduler` what happened
and carries out the decisions each event answers with:

    event (Scheduler method)          decisions it may answer with
    decide()                          Start a queued job, RetireWarmWorker
    job_started(job_id)               none: the job's clock (total_s, timeout_s) starts
    addresses_reported(job_id, ...)   TrainGang
    job_succeeded(job_id, result)     Record
    job_failed(job_id, ...)           RetireWarmWorker, then Start (a retry) or Record
    check_deadlines()                 Stop, RetireWarmWorker, Record ("timed out after ...")
    cancel(reason)                    Stop, RetireWarmWorker, Record ("cancelled: ...")
    recorded(job_id, status)          none: the record is kept, the job is done

Decisions come in the order to carry them out. Time comes from an injected clock, so
tests drive the policy with events and a fake clock; this module never imports Ray.

Where a job runs (`Placement`):
- a single-device job on a warm worker of its kind (framework, GPU share, user model
  code; jobs/run/warm_workers.py holds that pool's policy): an idle one, or a new one while
  the pool may grow. A GPU worker holds its GPU share for its life, so every job it runs
  trains on the same device;
- a mirrored job in a fresh process of its own: TensorFlow fixes a process's logical
  devices when its runtime starts, so a reused process could not split its devices anew;
- a multiworker or ddp job as a gang: all of its workers are reserved at once, report
  the addresses their peers reach them at (`Phase.ADDRESSES`), then train with their
  ranks (`Phase.TRAINING`).

Jobs outside the warm pool start first, in the order given, as --max-concurrent allows
(Ray then starts each as its resources come free); warm workers take the rest.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.plan.planning import PlannedJob
from jobs.run.warm_workers import WarmWorkerPool, kind_of, takes

if TYPE_CHECKING:
    pass


class Placement(enum.Enum):
    """Where one attempt of a job runs."""

    IDLE_WARM_WORKER = "an idle warm worker of its kind"
    NEW_WARM_WORKER = "a new warm worker of its kind"
    FRESH_PROCESS = "a fresh process that runs this job alone"
    GANG = "a gang of workers reserved together"

    @property
    def on_warm_worker(self) -> bool:
        return self in (Placement.IDLE_WARM_WORKER, Placement.NEW_WARM_WORKER)


class Phase(enum.Enum):
    """How far a job has come: a gang first gathers its workers' addresses, then trains."""

    ADDRESSES = "its workers report the addresses their peers reach them at"
    TRAINING = "training"


class Failure(enum.Enum):
    """Why a job failed, which decides whether a retry can help."""

    # The cluster's failure (a process or node died): a retry may well succeed.
    WORKER_LOST = "its worker process or node died"
    # The training code raised: it would usually raise again, so retried only with retry_exceptions.
    TRAINING_RAISED = "its training code raised"


@dataclass(eq=False)
class Run:
    """One attempt of a job, from the decision to start it until it ends."""

    job: PlannedJob
    attempt: int
    placement: Placement
    warm_worker: int | None = None  # the warm worker's number, on a warm worker
    phase: Phase = Phase.TRAINING
    submitted_at: float | None = None  # when the driver handed it to Ray (job_started)

    @property
    def deadline(self) -> float | None:
        timeout = self.job.spec.timeout_s
        if timeout is None or self.submitted_at is None:
            return None
        return self.submitted_at + timeout

    @property
    def cpus_outside_the_pool(self) -> int:
        """CPUs this job holds or waits for that warm workers must leave free."""
        if self.placement.on_warm_worker:
            return 0
        return 1 if self.job.spec.runs_one_task else self.job.spec.workers

    @property
    def gpus_outside_the_pool(self) -> float:
        """GPUs this job holds or waits for that warm workers must leave free."""
        return 0.0 if self.placement.on_warm_worker else float(self.job.spec.gpus_per_job or 0.0)


@dataclass(frozen=True)
class Start:
    """Hand `run` to Ray where run.placement says: call on_start, report job_started, submit.

    On NEW_WARM_WORKER, first create the actor for warm worker number run.warm_worker.
    """

    run: Run


@dataclass(frozen=True)
class TrainGang:
    """Every worker of the gang has an address: start each one training with its rank."""

    run: Run
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Stop:
    """End a running job's work and free what it holds (its record follows as a `Record`)."""

    run: Run


@dataclass(frozen=True)
class RetireWarmWorker:
    """End warm worker number `worker`: the scheduler no longer counts it."""

    worker: int


@dataclass(frozen=True)
class Record:
    """The job has ended: build its record (status, error, `result` fields) and keep it."""

    job: PlannedJob
    status: str
    error: str | None
    total_s: float
    result: dict[str, Any] | None = None


Decision = Start | TrainGang | Stop | RetireWarmWorker | Record


@dataclass(frozen=True)
class Cancellation:
    """What cancel decided, and how many of the cancelled jobs were running and not started."""

    decisions: list[Decision]
    running: int
    pending: int


class Scheduler:
    """The run's policy: a queue, the warm-worker pool, retries, deadlines and cancel.

    `cluster_cpus` and `cluster_gpus` answer how many CPUs and GPUs the cluster has now
    (asked at every `decide`, as nodes may come and go); `clock` gives the time in seconds
    (time.time in the driver). `max_concurrent` caps how many jobs run at once (None: the
    cluster decides). `keeps_idle`: warm workers outlive the run (jobs/run/warm_pool.py),
    so idle ones are kept, not ended, while no waiting job needs what they hold.
    """

    def __init__(
        self,
        jobs: list[PlannedJob],
        *,
        cluster_cpus: Callable[[], int],
        clock: Callable[[], float],
        max_concurrent: int | None = None,
        cluster_gpus: Callable[[], float] = lambda: 0.0,
        keeps_idle: bool = False,
    ) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent}: use a whole number >= 1, or None for no cap")
        self.jobs = list(jobs)
        self.cluster_cpus = cluster_cpus
        self.cluster_gpus = cluster_gpus
        self.clock = clock
        self.max_concurrent = max_concurrent
        self.queue: deque[PlannedJob] = deque(job for job in self.jobs if not takes(job.spec))
        self.pool = WarmWorkerPool(keeps_idle)
        for job in self.jobs:
            if takes(job.spec):
                self.pool.add(job)
        self.running: dict[str, Run] = {}  # job id -> its attempt now running
        # How many more jobs may still arrive (a search's feed): idle warm workers wait for them.
        self.more_to_come = 0
        # Only each kept record's status: records go to the driver's on_record and are not
        # kept here, so memory stays flat however many jobs a sweep has.
        self.kept_statuses: dict[str, str] = {}

    def add(self, jobs: list[PlannedJob]) -> None:
        """Jobs that arrived while the run goes on (a search's next trials), queued behind the others."""
        for job in jobs:
            self.jobs.append(job)
            if takes(job.spec):
                self.pool.add(job)
            else:
                self.queue.append(job)

    def adopt(self, kind: str) -> int:
        """An idle warm worker of `kind` an earlier run left (jobs/run/warm_pool.py); its number."""
        return self.pool.adopt(kind)

    # Queries.

    def has_work(self) -> bool:
        """Whether a job is still queued or running."""
        return bool(self.queue) or self.pool.has_pending() or bool(self.running)

    def seconds_to_next_deadline(self) -> float | None:
        """Seconds until the next running job's timeout_s runs out (0 once one has); None without any."""
        deadlines = [run.deadline for run in self.running.values() if run.deadline is not None]
        return max(min(deadlines) - self.clock(), 0.0) if deadlines else None

    def statuses(self) -> list[str]:
        """Each job's kept status (a pack's members each), in the order the jobs were given."""
        jobs = [member for job in self.jobs for member in job.jobs]
        missing = [job.id for job in jobs if job.id not in self.kept_statuses]
        if missing:
            raise RuntimeError(f"no record was kept for {', '.join(missing)}: ask once has_work() is false")
        return [self.kept_statuses[job.id] for job in jobs]

    # Events.

    def decide(self) -> list[Decision]:
        """Start what may start now; retire warm workers no longer needed."""
        decisions: list[Decision] = []
        # Jobs outside the pool go first: Ray queues them until their resources are free,
        # and --max-concurrent caps how many run at once.
        while self.queue and self._free_slots() != 0:
            decisions += self._start(self.queue.popleft(), attempt=1)
        room = self._warm_room()
        capacity = max(room, 1)
        if self.max_concurrent is not None:
            capacity = min(capacity, self.max_concurrent)
        gpu_capacity = self._warm_gpu_room()
        retired = self.pool.retire_unneeded(capacity, self.more_to_come, room, gpu_capacity)
        decisions += [RetireWarmWorker(worker) for worker in retired]
        for assignment in self.pool.assign(capacity, self._free_slots(), self.more_to_come, gpu_capacity):
            placement = Placement.NEW_WARM_WORKER if assignment.new_worker else Placement.IDLE_WARM_WORKER
            run = Run(assignment.job, assignment.attempt, placement, warm_worker=assignment.worker)
            self.running[run.job.id] = run
            decisions.append(Start(run))
        return decisions

    def job_started(self, job_id: str) -> None:
        """The driver has handed the job to Ray: from now on it counts towards total_s and timeout_s."""
        self._running(job_id).submitted_at = self.clock()

    def addresses_reported(self, job_id: str, addresses: list[str] | tuple[str, ...]) -> list[Decision]:
        """Every worker of a gang reported its address: the gang trains next."""
        run = self._running(job_id)
        if run.phase is not Phase.ADDRESSES:
            raise RuntimeError(f"{job_id} is {run.phase.value}, not gathering addresses")
        run.phase = Phase.TRAINING
        return [TrainGang(run, tuple(addresses))]

    def job_succeeded(self, job_id: str, result: dict[str, Any]) -> list[Decision]:
        """The job trained; `result` holds its record fields, whose timings teach the warm pool."""
        run = self._running(job_id)
        if run.phase is not Phase.TRAINING:
            raise RuntimeError(f"{job_id} cannot succeed while {run.phase.value}")
        del self.running[job_id]
        decisions: list[Decision] = []
        if run.warm_worker is not None:
            self.pool.observe(kind_of(run.job.spec), result.get("timings") or {})
            # A worker whose device failed its check, or holds too much of its memory, is
            # replaced (jobs/run/warm_workers.py, needs_replacing).
            if not self.pool.give_back(run.warm_worker, (result.get("placement") or {}).get("worker")):
                decisions.append(RetireWarmWorker(run.warm_worker))
        # Ended early by the run's stopping rule: its own status, not a failure.
        status = "stopped" if result.get("stopped") else "succeeded"
        return [*decisions, Record(run.job, status, None, self._elapsed(run), result)]

    def job_failed(
        self,
        job_id: str,
        error: str,
        failure: Failure,
        rank: int = 0,
        result: dict[str, Any] | None = None,
    ) -> list[Decision]:
        """A worker of the job failed (rank `rank`); the driver has freed the job's gang.

        A lost worker is retried while `retries` allow; a raising one only with
        retry_exceptions. Otherwise the job is recorded failed with `error`, the failing
        rank when it had several workers, and the attempts it took.
        """
        run = self._running(job_id)
        del self.running[job_id]
        decisions = self._end_warm_worker(run)
        spec = run.job.spec
        retryable = failure is Failure.WORKER_LOST or spec.retry_exceptions
        if retryable and run.attempt <= spec.retries:
            return decisions + self._start(run.job, run.attempt + 1)
        if run.placement is Placement.GANG and spec.workers > 1:
            error += f" (worker rank {rank} of {spec.workers})"
        if run.attempt > 1:
            error += f" (after {run.attempt} attempts)"
        return [*decisions, Record(run.job, "failed", error, self._elapsed(run), result)]

    def check_deadlines(self) -> list[Decision]:
        """The clock moved on: stop and record every running job past its timeout_s."""
        now = self.clock()
        decisions: list[Decision] = []
        for run in list(self.running.values()):
            if run.deadline is not None and now >= run.deadline:
                reason = f"timed out after {run.job.spec.timeout_s:g}s (timeout_s)"
                decisions += self._stop(run, reason, now)
        return decisions

    def cancel(self, reason: str) -> Cancellation:
        """Stop every running job and record it cancelled, and every job without a kept record too.

        A job whose record was decided but never kept (the cancel cut in) counts as not
        started and is recorded cancelled; nothing starts afterwards.
        """
        never_started = [
            job
            for job in self.jobs
            if job.id not in self.running and any(member.id not in self.kept_statuses for member in job.jobs)
        ]
        running = list(self.running.values())
        self.queue.clear()
        self.pool.drop_pending()
        now = self.clock()
        decisions: list[Decision] = []
        for run in running:
            decisions += self._stop(run, reason, now)
        decisions += [Record(job, "cancelled", reason, 0.0) for job in never_started]
        return Cancellation(
            decisions,
            sum(len(run.job.jobs) for run in running),
            sum(1 for job in never_started for member in job.jobs if member.id not in self.kept_statuses),
        )

    def recorded(self, job_id: str, status: str) -> None:
        """The driver kept the job's record (again, after an interrupted delivery: harmless).

        A pack's members are each recorded under their own ids; the pack's id never is.
        """
        self.kept_statuses[job_id] = status

    # The policy's parts.

    def _start(self, job: PlannedJob, attempt: int) -> list[Decision]:
        if takes(job.spec):
            self.pool.add(job, attempt)  # started when a warm worker is free
            return []
        if job.spec.runs_one_task:
            run = Run(job, attempt, Placement.FRESH_PROCESS)
        else:
            run = Run(job, attempt, Placement.GANG, phase=Phase.ADDRESSES)
        self.running[job.id] = run
        return [Start(run)]

    def _stop(self, run: Run, reason: str, now: float) -> list[Decision]:
        del self.running[run.job.id]
        return [
            Stop(run),
            *self._end_warm_worker(run),
            Record(run.job, "cancelled", reason, self._elapsed(run, now)),
        ]

    def _end_warm_worker(self, run: Run) -> list[Decision]:
        """A warm worker whose job failed, timed out or was cancelled is ended, never reused."""
        if run.warm_worker is None:
            return []
        self.pool.replace(run.warm_worker)
        return [RetireWarmWorker(run.warm_worker)]

    def _free_slots(self) -> int | None:
        """How many more jobs may start under --max-concurrent; None without a cap."""
        if self.max_concurrent is None:
            return None
        return max(self.max_concurrent - len(self.running), 0)

    def _warm_room(self) -> int:
        """Warm workers allowed: the cluster's CPUs less those the other jobs hold or wait for.

        A gang or mirrored task waiting for CPUs thus gets them as warm workers retire,
        rather than losing them to new warm workers. `decide` gives the pool at least one,
        so warm jobs always progress, and caps it by --max-concurrent.
        """
        held = sum(run.cpus_outside_the_pool for run in self.running.values())
        return max(int(self.cluster_cpus()) - held, 0)

    def _warm_gpu_room(self) -> float:
        """The GPUs warm workers may hold together: the cluster's less those other jobs hold or wait for."""
        held = sum(run.gpus_outside_the_pool for run in self.running.values())
        return max(float(self.cluster_gpus()) - held, 0.0)

    def _running(self, job_id: str) -> Run:
        try:
            return self.running[job_id]
        except KeyError:
            raise RuntimeError(f"{job_id} is not running: an event for it came after it ended") from None

    def _elapsed(self, run: Run, now: float | None = None) -> float:
        if run.submitted_at is None:
            return 0.0
        return (self.clock() if now is None else now) - run.submitted_at
