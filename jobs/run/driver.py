"""The driver: runs each job on Ray and gathers a record per job as it ends.

A single-device CPU job runs on a warm worker (jobs/run/warm_workers.py): an actor that keeps
its framework imported across jobs. A GPU or mirrored job is one Ray task with the job's
GPUs, in a fresh process. A multiworker or ddp job
is gang-scheduled: a placement group reserves all of its workers' bundles at once (so a
job never holds part of its devices while waiting for the rest), one actor per bundle
reports an address, and then every worker trains with its rank. A job that raises, or
whose worker dies, becomes a failed record carrying the cause; its actors and placement
group are released at once and the other jobs go on. Each record reaches `on_record`
the moment its job ends, so the caller can persist it before waiting for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.plan.spec import JobSpec
from jobs.record.records import empty_record
from jobs.run import warm_workers
from workers.data import Dataset


@dataclass(frozen=True)
class PlannedJob:
    id: str
    spec: JobSpec
    dataset: Dataset


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
    """One job on Ray: the references it waits on, and what to release when it ends."""

    job: PlannedJob
    submitted_at: float
    attempt: int = 1
    waiting: list[Any] = field(default_factory=list)  # ObjectRefs still pending
    results: dict[Any, Any] = field(default_factory=dict)  # ObjectRef -> result
    actors: list[Any] = field(default_factory=list)
    placement_group: Any = None
    warm_worker: Any = None  # the warm worker running a single-device CPU job
    phase: str = "train"  # "address" while a gang's workers report their addresses

    @property
    def deadline(self) -> float | None:
        timeout = self.job.spec.timeout_s
        return None if timeout is None else self.submitted_at + timeout

    def release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


class Driver:
    def __init__(
        self,
        on_record: Callable[[dict[str, Any]], None],
        on_start: Callable[[str], None] | None = None,
        max_concurrent: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        import ray

        from workers.entry import run_job
        from workers.worker_actor import DistributedWorker

        self.on_record = on_record
        self.on_start = on_start or (lambda job_id: None)
        self.max_concurrent = max_concurrent
        self.should_stop = should_stop
        self.next_stop_check = 0.0
        self.pool = warm_workers.WarmWorkerPool()
        # A GPU job, and a mirrored job that splits the CPU into logical devices, needs a
        # fresh process: the frameworks fix their devices (and CUDA_VISIBLE_DEVICES) when
        # they start, so a reused worker could train on the previous job's GPU; and a
        # process that exits hands its GPU memory back. max_calls=1 ends each process
        # after one job, and the runtime_env gives these tasks a worker pool of their own,
        # so no process that ran another job is ever leased to one of them.
        self.fresh_train_task = ray.remote(
            max_calls=1, runtime_env={"env_vars": {"RUNJOBS_FRESH_PROCESS": "1"}}
        )(run_job)
        self.worker_actor = ray.remote(DistributedWorker)
        self.dataset_refs: dict[int, Any] = {}
        self.executions: dict[Any, Execution] = {}  # pending ObjectRef -> its job's execution
        # Only each ended job's status: records go to on_record (the ledger) and are not
        # kept here, so the driver's memory stays flat however many jobs a sweep has.
        self.statuses: dict[str, str] = {}
        self.delivering: dict[str, Any] | None = None  # a record on its way to on_record

    def run(self, jobs: list[PlannedJob]) -> list[str]:
        """Run every job; return each job's final status, in the order given."""
        import ray

        queue = []
        for job in jobs:
            if warm_workers.takes(job.spec):
                self.pool.add(job)
            else:
                queue.append(job)
        queue.reverse()  # popped from the end, in the order given
        try:
            while queue or self.pool.has_pending() or self.executions:
                self._check_cancel_request()
                # Ray starts each task or gang as resources allow; warm workers take jobs
                # as they come free. --max-concurrent caps how many run at once.
                while queue and self._free_slots() != 0:
                    self._start(queue[-1])
                    queue.pop()
                for job, attempt, worker in self.pool.assignments(self._pool_capacity(), self._free_slots()):
                    self._start_on_warm_worker(job, attempt, worker)
                ready, _ = ray.wait(list(self.executions), num_returns=1, timeout=self._wait_timeout())
                for reference in ready:
                    self._collect(reference)
                self._cancel_overdue()
        except KeyboardInterrupt:
            raise self._stop_all(jobs, "cancelled: the run was interrupted", requested=False) from None
        except _CancelRequested:
            raise self._stop_all(jobs, "cancelled: runjobs cancel", requested=True) from None
        finally:
            # After an error (a full disk in on_record, say), free what still runs: its
            # actors, placement groups and CPUs would otherwise outlive the run.
            for execution in self._live_executions():
                self._abandon(execution)
            self.pool.shutdown()
        return [self.statuses[job.id] for job in jobs]

    def _stop_all(self, jobs: list[PlannedJob], reason: str, requested: bool) -> RunInterrupted:
        """Stop what is still running, record it and what never started as cancelled, keep what finished.

        Every job without a status is recorded, so a job caught between queue and start is
        not lost; a record the interrupt caught on its way to on_record is handed over
        again (on_record is idempotent).
        """
        if self.delivering is not None:
            self._deliver(self.delivering)
        running = self._live_executions()
        for execution in running:
            self._cancel(execution, reason)
        pending = 0
        for job in jobs:
            if job.id not in self.statuses:
                pending += 1
                self._finish(Execution(job, time.time()), "cancelled", reason)
        return RunInterrupted(len(running), pending, requested)

    def _check_cancel_request(self) -> None:
        """Raise _CancelRequested once `runjobs cancel` has asked; asks at most every CANCEL_POLL_S."""
        if self.should_stop is None or time.monotonic() < self.next_stop_check:
            return
        self.next_stop_check = time.monotonic() + CANCEL_POLL_S
        if self.should_stop():
            raise _CancelRequested()

    def _wait_timeout(self) -> float | None:
        """How long to wait for a job to end: until the next deadline, and the next cancel check."""
        timeouts = [self._time_to_deadline(), CANCEL_POLL_S if self.should_stop is not None else None]
        timeouts = [timeout for timeout in timeouts if timeout is not None]
        return min(timeouts) if timeouts else None

    def _free_slots(self) -> int | None:
        """How many more jobs may start under --max-concurrent; None without a cap."""
        return None if self.max_concurrent is None else max(self.max_concurrent - self._running(), 0)

    def _pool_capacity(self) -> int:
        """Warm workers allowed: the cluster's CPUs less those the other jobs hold or wait for.

        A gang or GPU task waiting for CPUs thus gets them as warm workers retire,
        rather than losing them to new warm workers. Capped by --max-concurrent.
        """
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        held = sum(
            1 if execution.job.spec.runs_one_task else execution.job.spec.workers
            for execution in self._live_executions()
            if execution.warm_worker is None
        )
        capacity = max(cpus - held, 1)
        return capacity if self.max_concurrent is None else min(capacity, self.max_concurrent)

    def _live_executions(self) -> list[Execution]:
        return list({id(execution): execution for execution in self.executions.values()}.values())

    def _time_to_deadline(self) -> float | None:
        deadlines = [execution.deadline for execution in self._live_executions() if execution.deadline]
        return max(min(deadlines) - time.time(), 0.0) if deadlines else None

    def _cancel_overdue(self) -> None:
        now = time.time()
        for execution in self._live_executions():
            if execution.deadline is not None and now >= execution.deadline:
                self._cancel(execution, f"timed out after {execution.job.spec.timeout_s:g}s (timeout_s)")

    def _cancel(self, execution: Execution, reason: str) -> None:
        """Stop a running job, free its actors and placement group, and record it cancelled."""
        self._abandon(execution)
        self._finish(execution, "cancelled", reason)

    def _abandon(self, execution: Execution) -> None:
        """Stop a job's work and free what it holds, without recording anything."""
        import ray

        for reference in execution.waiting:
            self.executions.pop(reference, None)
            # An actor's task cannot be force-cancelled: ending the actor stops it.
            if not execution.actors and execution.warm_worker is None:
                ray.cancel(reference, force=True)
        execution.release()
        self._release_warm_worker(execution, healthy=False)

    def _running(self) -> int:
        return len(self._live_executions())

    def _dataset(self, dataset: Dataset) -> Any:
        import ray

        # Jobs on the same data share one copy of it in Ray's object store.
        if id(dataset) not in self.dataset_refs:
            self.dataset_refs[id(dataset)] = ray.put(dataset)
        return self.dataset_refs[id(dataset)]

    def _start(self, job: PlannedJob, attempt: int = 1) -> None:
        if warm_workers.takes(job.spec):
            self.pool.add(job, attempt)  # started when a warm worker is free
            return
        self.on_start(job.id)
        execution = Execution(job, time.time(), attempt)
        spec = job.spec
        if spec.runs_one_task:
            reference = self.fresh_train_task.options(
                num_cpus=1,
                num_gpus=spec.gpus_per_job or 0,
                # A dead worker fails the job rather than silently training it twice.
                max_retries=0,
                name=f"runjobs:{job.id}",
            ).remote(spec, self._dataset(job.dataset), execution.submitted_at)
            self._wait_on(execution, [reference])
        else:
            self._start_gang(execution)

    def _start_on_warm_worker(self, job: PlannedJob, attempt: int, worker: Any) -> None:
        self.on_start(job.id)
        execution = Execution(job, time.time(), attempt, warm_worker=worker)
        reference = worker.run.remote(job.spec, self._dataset(job.dataset), execution.submitted_at)
        self._wait_on(execution, [reference])

    def _release_warm_worker(self, execution: Execution, healthy: bool) -> None:
        if execution.warm_worker is None:
            return
        framework = execution.job.spec.framework
        if healthy:
            self.pool.give_back(framework, execution.warm_worker)
        else:
            self.pool.replace(framework, execution.warm_worker)
        execution.warm_worker = None

    def _start_gang(self, execution: Execution) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = execution.job.spec
        gpus_per_worker = (spec.gpus_per_job or 0) / spec.workers
        bundle = {"CPU": 1.0, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        job_id = execution.job.id
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
        execution.phase = "address"
        self._wait_on(execution, [actor.address.remote() for actor in execution.actors])

    def _wait_on(self, execution: Execution, references: list[Any]) -> None:
        execution.waiting = list(references)
        execution.results = {}
        for reference in references:
            self.executions[reference] = execution

    def _collect(self, reference: Any) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        execution = self.executions.pop(reference)
        try:
            execution.results[reference] = ray.get(reference)
        except (RayTaskError, RayError) as error:
            # One worker failed: the job has failed. Stop its other workers now rather
            # than let them wait out a collective timeout.
            for other in execution.waiting:
                self.executions.pop(other, None)
            execution.release()
            self._release_warm_worker(execution, healthy=False)
            spec = execution.job.spec
            # A dead worker or node is the cluster's failure: retry it when asked. An
            # exception in the training code would fail the same way again, so it is
            # retried only with retry_exceptions.
            retryable = not isinstance(error, RayTaskError) or spec.retry_exceptions
            if retryable and execution.attempt <= spec.retries:
                self._start(execution.job, execution.attempt + 1)
                return
            message = describe_error(error)
            logs = getattr(getattr(error, "cause", None), "runjobs_logs", None)
            rank = execution.waiting.index(reference)
            if len(execution.waiting) > 1:
                message += f" (worker rank {rank} of {spec.workers})"
            if execution.attempt > 1:
                message += f" (after {execution.attempt} attempts)"
            self._finish(execution, "failed", message, {"logs": [{"rank": rank, **logs}]} if logs else None)
            return
        if len(execution.results) < len(execution.waiting):
            return
        results = [execution.results[item] for item in execution.waiting]
        if execution.phase == "address":
            self._start_training(execution, results)
            return
        execution.release()
        if execution.warm_worker is not None:
            self.pool.observe(execution.job.spec.framework, results[0]["timings"])
        self._release_warm_worker(execution, healthy=True)
        self._finish(execution, "succeeded", None, merge_worker_results(results))

    def _start_training(self, execution: Execution, addresses: list[str]) -> None:
        from workers.distributed import WorkerContext

        spec = execution.job.spec
        execution.phase = "train"
        dataset = self._dataset(execution.job.dataset)
        references = [
            actor.run.remote(
                spec,
                dataset,
                execution.submitted_at,
                WorkerContext(rank, spec.workers, tuple(addresses), spec.setup_timeout_s),
            )
            for rank, actor in enumerate(execution.actors)
        ]
        self._wait_on(execution, references)

    def _finish(
        self, execution: Execution, status: str, error: str | None, result: dict | None = None
    ) -> None:
        record = job_record(execution.job, status, error, result or {})
        record["timings"]["total_s"] = time.time() - execution.submitted_at
        self._deliver(record)

    def _deliver(self, record: dict[str, Any]) -> None:
        # The status is set only once on_record has kept the record: an interrupt in
        # between finds it in `delivering` and hands it over again.
        self.delivering = record
        self.on_record(record)
        self.statuses[record["id"]] = record["status"]
        self.delivering = None


def run_jobs(
    jobs: list[PlannedJob],
    on_record: Callable[[dict[str, Any]], None],
    on_start: Callable[[str], None] | None = None,
    max_concurrent: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Run every job on Ray, handing each record to on_record as it ends; return the statuses.

    `should_stop` is asked a few times a second; once it answers true, the run stops as
    on Ctrl-C and RunInterrupted(requested=True) is raised.
    """
    return Driver(on_record, on_start, max_concurrent, should_stop).run(jobs)


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
                    for key in ("node_id", "hostname", "device", "gpu_ids", "cpu_fallback")
                }
                for item in results
            ],
        }
    return merged


def job_record(job: PlannedJob, status: str, error: str | None, result: dict[str, Any]) -> dict[str, Any]:
    record = empty_record(job.id, job.spec.to_record(), status, error)
    record.update(result)
    record.pop("rank", None)
    return record


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
