"""The driver: the Ray layer that carries out the scheduler's decisions and reports what Ray did.

jobs/run/scheduler.py decides which job starts next and where, retries, deadlines and
cancel, without Ray; this module turns each of its decisions into Ray calls and each
Ray outcome into one of its events. A single-device job runs on a warm worker: an actor
that keeps its framework imported (and its GPU share, if any) across jobs
(jobs/run/warm_workers.py holds the pool's policy; only the actors' creation and ray.kill
are here). On a cluster runjobs did not start, the warm workers outlive the run and the
next run adopts them (jobs/run/warm_pool.py, `PoolLease`). A mirrored job is one Ray
task with the job's GPUs, in a fresh process. A multiworker or ddp job is
gang-scheduled: a placement group reserves all of its workers' bundles at once (so a
job never holds part of its devices while waiting for the rest), one actor per bundle
reports an address, and then every worker trains with its rank. A job that raises, or
whose worker dies, becomes a failed record carrying the cause; its actors and placement
group are released at once and the other jobs go on. Each record reaches `on_record`
the moment its job ends, so the caller can persist it before waiting for the rest.

Packs (jobs/plan/packing.py) are formed here, once the cluster's CPUs are known: the
scheduler places a pack as one job on a warm worker, and each of its members starts and
is recorded as its own job, a pack's starts and records each kept together (`together`,
one ledger transaction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.plan.packing import pack_jobs
from jobs.plan.planning import PlannedJob
from jobs.record.records import JobOutcome, job_outcome
from jobs.run.executor import JobFeed
from jobs.run.scheduler import (
    Decision,
    Failure,
    Phase,
    Placement,
    Record,
    RetireWarmWorker,
    Run,
    Scheduler,
    Start,
    Stop,
    TrainGang,
)
from jobs.run.stopping import StoppingPolicy, StoppingRule
from jobs.run.warm_pool import SCAN_S, PoolLease
from jobs.run.warm_workers import gpus_of
from workers.data import Dataset

__all__ = [
    "CANCEL_POLL_S",
    "Driver",
    "Execution",
    "PlannedJob",
    "RunInterrupted",
    "describe_error",
    "planned_outcome",
    "merge_worker_results",
    "run_jobs",
]


class RunInterrupted(KeyboardInterrupt):
    """The run was interrupted; every job has been handed to on_record, finished or cancelled.

    `running` and `pending` count the jobs it cancelled that were running, and that had
    not started; `requested` is true when `runjobs cancel` asked for it (not a signal).
    """

    def __init__(self, running: int = 0, pending: int = 0, requested: bool = False) -> None:
        super().__init__("interrupted")
        self.running = running
        self.pending = pending
        self.requested = requested


class _CancelRequested(Exception):
    """`runjobs cancel` asked this run to stop (seen through should_stop)."""


# How often the driver asks whether `runjobs cancel` wants the run stopped: a cancel is
# answered within about this long, and the question (one SQLite read) costs ~50 us.
CANCEL_POLL_S = 0.25


@dataclass
class Execution:
    """One attempt of a job on Ray: the references it waits on, and what to release when it ends."""

    run: Run
    waiting: list[Any] = field(default_factory=list)  # ObjectRefs still pending
    results: dict[Any, Any] = field(default_factory=dict)  # ObjectRef -> result
    actors: list[Any] = field(default_factory=list)  # a gang's workers
    placement_group: Any = None

    def release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


# What a mirrored job's record says of its process (placement.worker).
FRESH_PROCESS_WHY = (
    "TensorFlow fixes a process's logical devices when its runtime starts, so each mirrored job "
    "splits its devices in a process of its own"
)


class Driver:
    def __init__(
        self,
        on_record: Callable[[JobOutcome, bool], None],
        on_start: Callable[[str], None] | None = None,
        max_concurrent: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        stopping: StoppingRule | None = None,
        on_progress: Callable[[dict[str, list[float]]], None] | None = None,
        say: Callable[[str], None] | None = None,
        pool: PoolLease | None = None,
        together: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        on_pack: Callable[[PlannedJob, list[JobOutcome]], None] | None = None,
    ) -> None:
        import ray

        from workers.entry import run_job
        from workers.worker_actor import DistributedWorker, WarmWorker

        self.on_record = on_record
        self.on_start = on_start or (lambda job_id: None)
        self.max_concurrent = max_concurrent
        self.should_stop = should_stop
        self.next_stop_check = 0.0
        # A mirrored job needs a fresh process (see jobs/run/scheduler.py). max_calls=1
        # ends each process after one job, and the runtime_env gives these tasks a worker
        # pool of their own, so no process that ran another job is ever leased to one of them.
        self.fresh_train_task = ray.remote(
            max_calls=1, runtime_env={"env_vars": {"RUNJOBS_FRESH_PROCESS": "1"}}
        )(run_job)
        self.worker_actor = ray.remote(DistributedWorker)
        self.warm_worker_class = WarmWorker
        self.warm_workers: dict[int, Any] = {}  # the scheduler's warm worker number -> its actor
        self.warm_kinds: dict[int, str] = {}  # the scheduler's warm worker number -> its kind
        # On a cluster runjobs did not start: the warm pool that outlives the run, and the
        # workers this run created that have not ended a job yet (they may wait for CPUs).
        self.pool = pool
        self.starting_workers: set[int] = set()
        self.dataset_refs: dict[int, Any] = {}
        self.executions: dict[Any, Execution] = {}  # pending ObjectRef -> its job's execution
        self.by_job: dict[str, Execution] = {}  # job id -> its execution, while it runs
        # Records decided but not yet kept by on_record (a pack's members, in order): an
        # interrupt finds them here and hands them over before anything is cancelled.
        self.delivering: list[JobOutcome] = []
        self.scheduler: Scheduler | None = None
        # Early stopping (jobs/run/stopping.py): the run's board, an actor the jobs report
        # to, and the policy that reads it here; each running job's latest report.
        self.stopping = stopping
        self.policy = StoppingPolicy(stopping) if stopping is not None else None
        self.board = None
        self.stop_reasons: dict[str, str] = {}
        self.latest: dict[str, list[float]] = {}
        self.on_progress = on_progress
        self.say = say or (lambda message: None)
        # A pack's member starts and records are kept together (one ledger transaction), and
        # its end is shown once (on_pack) rather than once a member.
        self.together = together
        self.on_pack = on_pack

    def run(self, jobs: list[PlannedJob], feed: JobFeed | None = None) -> list[str]:
        """Run every job, and the feed's as they come; return each job's final status, in the order run."""
        import ray

        if feed is None:
            # A search's trials come one at a time as earlier ones end: they are never packed.
            workers = self.max_concurrent or max(_cluster_cpus(), 1)
            packing = pack_jobs(jobs, workers, stopping=self.stopping is not None)
            packs = packing.packs
            if packs:
                packed = sum(len(pack.members) for pack in packs)
                self.say(
                    f"packed {packed} of {len(jobs)} job(s) into {len(packs)} pack(s) of up to "
                    f"{max(len(pack.members) for pack in packs)}, each trained as one program"
                )
            jobs = packing.units
        self.scheduler = Scheduler(
            jobs,
            cluster_cpus=_cluster_cpus,
            cluster_gpus=_cluster_gpus,
            clock=time.time,
            max_concurrent=self.max_concurrent,
            keeps_idle=self.pool is not None and self.pool.keep_warm.keeps_any(),
        )
        if self.pool is not None:
            self._adopt(self.pool.adopt(self._wanted_kinds()))
            self.pool.start_renewing(lambda: list(self.warm_workers.values()))
        if self.stopping is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from workers.reporting import StoppingBoard

            # No CPU of its own (it only keeps reports, and must not take a job's place), on
            # the driver's node: the run goes on as long as the driver does, whichever worker
            # node is lost.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.board = (
                ray.remote(StoppingBoard)
                .options(
                    num_cpus=0,
                    max_restarts=0,
                    scheduling_strategy=here,
                    name=f"runjobs:stopping:{uuid.uuid4().hex[:8]}",
                )
                .remote()
            )
        try:
            while self.scheduler.has_work() or (feed is not None and not feed.exhausted()):
                self._check_cancel_request()
                if feed is not None:
                    self.scheduler.add(feed.take())
                    self.scheduler.more_to_come = feed.remaining()
                    if not self.scheduler.has_work():
                        break  # a feed that is not exhausted yet gave nothing to wait for

                # Ray starts each task or gang as resources allow; warm workers take jobs
                # as they come free. --max-concurrent caps how many run at once.
                self._tend_pool()
                self._carry_out(self.scheduler.decide())
                if not self.executions:
                    # Nothing runs: the queued jobs wait for warm workers another run holds
                    # (jobs/run/warm_pool.py), which the pool looks for again in a moment.
                    time.sleep(self._wait_timeout() or CANCEL_POLL_S)
                    ready = []
                else:
                    ready, _ = ray.wait(list(self.executions), num_returns=1, timeout=self._wait_timeout())
                for reference in ready:
                    self._collect(reference)
                self._apply_stopping_rule()
                self._carry_out(self.scheduler.check_deadlines())
        except KeyboardInterrupt:
            raise self._stop_all("cancelled: the run was interrupted", requested=False) from None
        except _CancelRequested:
            raise self._stop_all("cancelled: runjobs cancel", requested=True) from None
        finally:
            # After an error (a full disk in on_record, say), free what still runs: its
            # actors, placement groups and CPUs would otherwise outlive the run. A warm
            # worker still busy then ends; idle ones end too, or go back to the pool.
            for execution in list(self.by_job.values()):
                if execution.run.warm_worker is not None:
                    self._retire_warm_worker(execution.run.warm_worker)
                self._abandon(execution)
            if self.pool is not None:
                self.pool.stop_renewing()
            self._end_warm_workers()
            if self.board is not None:
                ray.kill(self.board, no_restart=True)
                self.board = None
        return self.scheduler.statuses()

    def _adopt(self, adopted: list[tuple[str, Any]]) -> None:
        """Warm workers an earlier run left (jobs/run/warm_pool.py) join this run's pool, idle."""
        for kind, actor in adopted:
            worker = self.scheduler.adopt(kind)
            self.warm_workers[worker] = actor
            self.warm_kinds[worker] = kind

    def _wanted_kinds(self) -> dict[str, int]:
        """The warm kinds this run has jobs queued for, and how many."""
        return {kind: len(queue) for kind, queue in self.scheduler.pool.pending.items() if queue}

    def _waiting(self) -> bool:
        """Whether this run's work waits: queued warm jobs, new workers not started yet, a gang
        gathering its workers (their CPUs may be held by idle kept workers)."""
        self.starting_workers &= self.warm_workers.keys()
        return (
            self.scheduler.pool.has_pending()
            or bool(self.starting_workers)
            or any(run.phase is Phase.ADDRESSES for run in self.scheduler.running.values())
        )

    def _tend_pool(self) -> None:
        """While this run's work waits: make room in the kept pool, adopt what was given back
        since, and ask an autoscaler for the GPU workers that do not fit (jobs/run/warm_pool.py)."""
        if self.pool is None or not self._waiting():
            return
        wanted = self._wanted_kinds()
        self._adopt(self.pool.reclaim(wanted))
        bundles = [
            {"CPU": 1.0, "GPU": gpus_of(kind)}
            for kind, count in wanted.items()
            if gpus_of(kind)
            for _ in range(count + self.scheduler.pool.live[kind])
        ]
        if bundles or self.pool.requested:
            self.pool.request_devices(bundles)

    def _end_warm_workers(self) -> None:
        """The run is over: its idle warm workers go back to the pool (a kept kind) or end."""
        import ray

        workers = {
            self.warm_workers.pop(number): self.warm_kinds.pop(number) for number in list(self.warm_workers)
        }
        if self.pool is not None:
            self.pool.give_back(workers)
            return
        for actor in workers:
            ray.kill(actor, no_restart=True)

    def _apply_stopping_rule(self) -> None:
        """Read the jobs' reports from the board, judge each by the rule, mark the jobs to stop."""
        if self.board is None:
            return
        import ray
        from ray.exceptions import RayError

        try:
            reports = ray.get(self.board.drain.remote())
        except RayError as error:
            # The board is lost (its node died, say): the jobs train on to their end (their
            # monitors take a lost board as "go on"); the run itself is not the board's.
            self.board = None
            lost = describe_error(error)
            self.say(f"early stopping is off for the rest of this run: its board was lost ({lost})")
            return
        to_stop = []
        for job_id, epoch, loss in reports:
            if job_id not in self.by_job or job_id in self.stop_reasons:
                continue  # ended meanwhile, or already told
            self.latest[job_id] = [epoch, loss]
            reason = self.policy.observe(job_id, epoch, loss)
            if reason is not None:
                self.stop_reasons[job_id] = reason
                to_stop.append(job_id)
        if to_stop:
            self.board.stop.remote(to_stop)
        if reports and self.on_progress is not None:
            self.on_progress(dict(self.latest))

    def _ended_for_stopping(self, job_id: str, result: dict[str, Any] | None) -> None:
        """A job ended: its history joins the rule's comparisons, its board marks go.

        Without a result (failed, timed out, cancelled) its reports still on the board are
        read and dropped first, and the rule forgets it: a retry starts with a clean slate
        rather than being judged on the first attempt's epochs.
        """
        if self.board is None:
            return
        if result is None:
            self._apply_stopping_rule()  # the job is no longer running: its reports are dropped
            if self.board is None:
                return
            self.policy.forget(job_id)
        self.latest.pop(job_id, None)
        reason = self.stop_reasons.pop(job_id, None)
        loss = (result or {}).get("loss") or {}
        self.policy.ended(job_id, loss.get("history"), (result or {}).get("history_epochs"))
        if result is not None and result.get("stopped"):
            result["stopped"]["reason"] = reason or "stopped by the stopping rule"
            result["stopped"]["rule"] = self.stopping.described()
        self.board.forget.remote(job_id)

    def _monitor_for(self, run: Run) -> tuple[Any, dict[str, Any]]:
        """The job as its worker gets it, and the monitor argument when it reports to the board."""
        job = run.job.spec.for_worker()
        if self.board is None or run.job.spec.variant != "single":
            return job, {}
        from workers.reporting import BoardMonitor

        job = dataclasses.replace(job, report_every=self.stopping.every)
        return job, {"monitor": BoardMonitor(self.board, run.job.id)}

    def _stop_all(self, reason: str, requested: bool) -> RunInterrupted:
        """Stop what is still running, record it and what never started as cancelled, keep what finished.

        Every job without a kept record is recorded, so a job caught between queue and
        start is not lost; a record the interrupt caught on its way to on_record is handed
        over again (on_record is idempotent).
        """
        for outcome in list(self.delivering):
            self._deliver(outcome)
        cancellation = self.scheduler.cancel(reason)
        self._carry_out(cancellation.decisions)
        return RunInterrupted(cancellation.running, cancellation.pending, requested)

    def _check_cancel_request(self) -> None:
        """Raise _CancelRequested once `runjobs cancel` has asked; asks at most every CANCEL_POLL_S."""
        if self.should_stop is None or time.monotonic() < self.next_stop_check:
            return
        self.next_stop_check = time.monotonic() + CANCEL_POLL_S
        if self.should_stop():
            raise _CancelRequested()

    def _wait_timeout(self) -> float | None:
        """How long to wait for a job to end: until the next deadline, cancel check or look at the reports."""
        timeouts = [
            self.scheduler.seconds_to_next_deadline(),
            CANCEL_POLL_S if self.should_stop is not None or self.board is not None else None,
            # While this run's work waits, the kept pool is looked at again (_tend_pool).
            SCAN_S if self.pool is not None and self._waiting() else None,
        ]
        timeouts = [timeout for timeout in timeouts if timeout is not None]
        return min(timeouts) if timeouts else None

    # Decisions, carried out on Ray.

    def _carry_out(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, Start):
                self._start(decision.run)
            elif isinstance(decision, TrainGang):
                self._start_training(decision.run, decision.addresses)
            elif isinstance(decision, Stop):
                execution = self.by_job.get(decision.run.job.id)
                # None when an interrupt came between the decision to start and the start.
                if execution is not None:
                    self._abandon(execution)
                self._ended_for_stopping(decision.run.job.id, None)
            elif isinstance(decision, RetireWarmWorker):
                self._retire_warm_worker(decision.worker)
            elif isinstance(decision, Record):
                self._record(decision)
            else:
                raise TypeError(f"the driver cannot carry out {decision!r}")

    def _start(self, run: Run) -> None:
        job, spec = run.job, run.job.spec
        if run.placement is Placement.NEW_WARM_WORKER:
            kind = self.scheduler.pool.kind_of_worker[run.warm_worker]
            self.warm_kinds[run.warm_worker] = kind
            if self.pool is not None:
                actor = self.pool.create(self.warm_worker_class, kind, gpus_of(kind))
                self.starting_workers.add(run.warm_worker)
            else:
                actor = self.warm_worker_class.options(
                    num_cpus=1,
                    num_gpus=gpus_of(kind),
                    max_restarts=0,
                    # Named, so an operator (or a test) can find the warm workers in Ray's state.
                    name=f"runjobs:warm:{spec.framework}:{uuid.uuid4().hex[:8]}",
                ).remote({"kind": kind})
            self.warm_workers[run.warm_worker] = actor
        with self.together():
            for member in job.jobs:
                self.on_start(member.id)
        self.scheduler.job_started(job.id)
        execution = Execution(run)
        self.by_job[job.id] = execution
        if job.members:  # a pack: always a single-device kind, on a warm worker
            from workers.packed import TrainingPack

            training_pack = TrainingPack(job.id, tuple(member.spec.for_worker() for member in job.members))
            worker = self.warm_workers[run.warm_worker]
            reference = worker.run.remote(training_pack, self._dataset(job.dataset), run.submitted_at)
            self._wait_on(execution, [reference])
        elif run.placement.on_warm_worker:
            worker = self.warm_workers[run.warm_worker]
            training_job, monitor = self._monitor_for(run)
            reference = worker.run.remote(
                training_job, self._dataset(job.dataset), run.submitted_at, **monitor
            )
            self._wait_on(execution, [reference])
        elif run.placement is Placement.FRESH_PROCESS:
            training_job, monitor = self._monitor_for(run)
            reference = self.fresh_train_task.options(
                num_cpus=1,
                num_gpus=spec.gpus_per_job or 0,
                # A dead worker fails the job rather than silently training it twice.
                max_retries=0,
                name=f"runjobs:{job.id}",
            ).remote(training_job, self._dataset(job.dataset), run.submitted_at, **monitor)
            self._wait_on(execution, [reference])
        else:
            self._start_gang(execution)

    def _start_gang(self, execution: Execution) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = execution.run.job.spec
        gpus_per_worker = (spec.gpus_per_job or 0) / spec.workers
        bundle = {"CPU": 1.0, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        job_id = execution.run.job.id
        execution.placement_group = placement_group(
            [dict(bundle) for _ in range(spec.workers)],
            strategy=spec.placement.upper(),
            name=f"runjobs:{job_id}",
        )
        execution.actors = [
            self.worker_actor.options(
                num_cpus=1,
                num_gpus=gpus_per_worker,
                max_restarts=0,
                # Named, so an operator (or a test) can find a job's workers in Ray's state.
                name=f"runjobs:{job_id}:rank{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    execution.placement_group, placement_group_bundle_index=rank
                ),
            ).remote()
            for rank in range(spec.workers)
        ]
        self._wait_on(execution, [actor.address.remote() for actor in execution.actors])

    def _start_training(self, run: Run, addresses: tuple[str, ...]) -> None:
        from workers.distributed import WorkerContext

        execution = self.by_job[run.job.id]
        spec = run.job.spec
        dataset = self._dataset(run.job.dataset)
        references = [
            actor.run.remote(
                spec.for_worker(),
                dataset,
                run.submitted_at,
                WorkerContext(rank, spec.workers, addresses, spec.setup_timeout_s),
            )
            for rank, actor in enumerate(execution.actors)
        ]
        self._wait_on(execution, references)

    def _abandon(self, execution: Execution) -> None:
        """Stop a job's work and free what it holds, without recording anything."""
        import ray

        for reference in execution.waiting:
            self.executions.pop(reference, None)
            # An actor's task cannot be force-cancelled: ending the actor stops it (a
            # warm worker's end is the scheduler's RetireWarmWorker that follows).
            if not execution.actors and execution.run.warm_worker is None:
                ray.cancel(reference, force=True)
        execution.release()
        self.by_job.pop(execution.run.job.id, None)

    def _retire_warm_worker(self, worker: int) -> None:
        import ray

        actor = self.warm_workers.pop(worker, None)
        self.warm_kinds.pop(worker, None)
        # None when an interrupt came between the decision to create the worker and its creation.
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def _record(self, decision: Record) -> None:
        if decision.job.members:
            self._record_pack(decision)
            return
        outcome = planned_outcome(decision.job, decision.status, decision.error, decision.result or {})
        outcome.record["timings"]["total_s"] = decision.total_s
        self._deliver(outcome)

    def _record_pack(self, decision: Record) -> None:
        """Every member of an ended pack, from its own outcome, kept together.

        A pack that succeeded gives each member its own status, error and result; a pack
        that failed, timed out or was cancelled records each member so. A member kept
        before an interrupt cut in is not recorded again. The pack's output goes with its
        first member, as the pack's own log files (logs/PACK.out, .err).
        """
        result = decision.result or {}
        members = result.get("members") or []
        worker = (result.get("placement") or {}).get("worker")  # the warm worker that trained the pack
        outcomes = []
        for index, member in enumerate(decision.job.members):
            if member.id in self.scheduler.kept_statuses:
                continue
            if decision.status == "succeeded" and index < len(members):
                entry = members[index]
                status, error = entry["status"], entry.get("error")
                fields = dict(entry.get("result") or {})
            elif decision.status == "succeeded":
                status, error, fields = "failed", "its pack's result held no outcome for it", {}
            else:
                status, error, fields = decision.status, decision.error, {}
            if not fields.get("timings"):
                fields["timings"] = {"pack": {"id": decision.job.id, "size": len(decision.job.members)}}
            if fields.get("placement") and worker is not None:
                fields["placement"] = {**fields["placement"], "worker": worker}
            if not outcomes:
                fields["logs"] = [{**entry, "name": decision.job.id} for entry in result.get("logs") or []]
            outcome = planned_outcome(member, status, error, fields)
            outcome.record["timings"]["total_s"] = decision.total_s
            outcomes.append(outcome)
        # Every member is on its way before the first is kept: an interrupt while they are
        # kept finds the rest in `delivering`, so no trained member is recorded cancelled.
        self.delivering.extend(outcomes)
        kept = []
        try:
            with self.together():
                for outcome in outcomes:
                    self._deliver(outcome, quiet=self.on_pack is not None)
                    kept.append(outcome)
        finally:
            # Shown once, with what was kept (all of it, unless an interrupt cut in).
            if self.on_pack is not None and kept:
                self.on_pack(decision.job, kept)

    def _deliver(self, outcome: JobOutcome, quiet: bool = False) -> None:
        # The scheduler hears of the record only once on_record has kept it: an interrupt
        # in between finds it in `delivering` and hands it over again.
        if not any(item is outcome for item in self.delivering):
            self.delivering.append(outcome)
        self.on_record(outcome, quiet)
        self.scheduler.recorded(outcome.id, outcome.status)
        # By identity: a pack's members are delivered in order, so this is the first.
        del self.delivering[next(index for index, item in enumerate(self.delivering) if item is outcome)]

    # Ray's outcomes, reported to the scheduler.

    def _collect(self, reference: Any) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        execution = self.executions.pop(reference)
        job_id = execution.run.job.id
        self.starting_workers.discard(execution.run.warm_worker)
        try:
            execution.results[reference] = ray.get(reference)
        except RayError as error:
            # One worker failed: the job has failed. Stop its other workers now rather
            # than let them wait out a collective timeout.
            for other in execution.waiting:
                self.executions.pop(other, None)
            execution.release()
            self.by_job.pop(job_id, None)
            # A dead worker or node is the cluster's failure; an exception in the training
            # code (a RayTaskError) is the job's own.
            failure = Failure.TRAINING_RAISED if isinstance(error, RayTaskError) else Failure.WORKER_LOST
            rank = execution.waiting.index(reference)
            logs = getattr(getattr(error, "cause", None), "runjobs_logs", None)
            result = {"logs": [{"rank": rank, **logs}]} if logs else None
            self._ended_for_stopping(job_id, None)
            self._carry_out(self.scheduler.job_failed(job_id, describe_error(error), failure, rank, result))
            return
        if len(execution.results) < len(execution.waiting):
            return
        results = [execution.results[item] for item in execution.waiting]
        if execution.run.phase is Phase.ADDRESSES:
            self._carry_out(self.scheduler.addresses_reported(job_id, results))
            return
        execution.release()
        self.by_job.pop(job_id, None)
        merged = merge_worker_results(results)
        if execution.run.placement is Placement.FRESH_PROCESS:
            merged["placement"] = {
                **merged["placement"],
                "worker": {"process": "fresh", "why": FRESH_PROCESS_WHY},
            }
        self._ended_for_stopping(job_id, merged)
        self._carry_out(self.scheduler.job_succeeded(job_id, merged))

    def _dataset(self, dataset: Dataset) -> Any:
        import ray

        # Jobs on the same data share one copy of it in Ray's object store.
        if id(dataset) not in self.dataset_refs:
            self.dataset_refs[id(dataset)] = ray.put(dataset)
        return self.dataset_refs[id(dataset)]

    def _wait_on(self, execution: Execution, references: list[Any]) -> None:
        execution.waiting = list(references)
        execution.results = {}
        for reference in references:
            self.executions[reference] = execution


def run_jobs(
    jobs: list[PlannedJob],
    on_record: Callable[[JobOutcome, bool], None],
    on_start: Callable[[str], None] | None = None,
    max_concurrent: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    feed: JobFeed | None = None,
    stopping: StoppingRule | None = None,
    on_progress: Callable[[dict[str, list[float]]], None] | None = None,
    say: Callable[[str], None] | None = None,
    pool: PoolLease | None = None,
    together: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_pack: Callable[[PlannedJob, list[JobOutcome]], None] | None = None,
) -> list[str]:
    """Run every job on Ray, and the feed's, handing each record to on_record as it ends; return the statuses.

    `should_stop` is asked a few times a second; once it answers true, the run stops as
    on Ctrl-C and RunInterrupted(requested=True) is raised. With `pool`, warm workers
    outlive the run (jobs/run/warm_pool.py).
    """
    driver = Driver(
        on_record, on_start, max_concurrent, should_stop, stopping, on_progress, say, pool, together, on_pack
    )
    return driver.run(jobs, feed)


def merge_worker_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's result, with every rank's train time, placement and output."""
    merged = dict(results[0])
    merged["logs"] = [{"rank": rank, **result.get("logs", {})} for rank, result in enumerate(results)]
    if len(results) > 1:
        merged["timings"] = {
            **merged["timings"],
            "rank_train_s": [item["timings"]["train_s"] for item in results],
        }
        merged["placement"] = {
            **merged["placement"],
            "workers": [
                {
                    key: item["placement"][key]
                    for key in (
                        "node_id",
                        "hostname",
                        "device",
                        "gpu_ids",
                        "cpu_fallback",
                        "cuda_visible_devices",
                    )
                }
                for item in results
            ],
        }
    return merged


def planned_outcome(job: PlannedJob, status: str, error: str | None, result: dict[str, Any]) -> JobOutcome:
    """A planned job's outcome: its record (id, config, status, error, results) with its files beside it."""
    return job_outcome(job.id, job.spec.to_record(), status, error, result)


def describe_error(error: Exception) -> str:
    """The original exception's type and message, without Ray's traceback framing.

    A worker that died has no exception of its own: the most specific cause Ray gives is
    kept, the process and node it died on and why (an ActorDiedError's exit detail).
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = f"{type(error).__name__}: {lines[0]}"
    fields = dict(
        line.split(": ", 1) for line in lines[1:] if ": " in line and " " not in line.split(": ")[0]
    )
    if "pid" in fields or "ip" in fields:
        text += f" (pid {fields.get('pid', '?')} on {fields.get('ip', '?')})"
    reason = next((line for line in lines[1:] if " is dead because " in line), None)
    if reason:
        # Ray follows the exit detail with a paragraph of generic advice; the detail is the news.
        text += " " + reason.split(" Some common causes include")[0]
    return text
