"""The driver: submits each job as one Ray task and gathers a record per job as it ends.

A job that raises, or whose worker dies, becomes a failed record carrying the cause;
the other jobs go on. Each record reaches `on_record` the moment its job ends, so the
caller can persist it before waiting for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.spec import JobSpec
from workers.data import Dataset


@dataclass(frozen=True)
class PlannedJob:
    id: str
    spec: JobSpec
    dataset: Dataset


def run_jobs(jobs: list[PlannedJob], on_record: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run every job as a Ray task; return their records in the order given."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    from workers.entry import run_job

    train_task = ray.remote(run_job)
    # Jobs on the same data share one copy of it in Ray's object store.
    dataset_refs: dict[int, Any] = {}
    submitted: dict[Any, tuple[PlannedJob, float]] = {}
    for job in jobs:
        dataset_ref = dataset_refs.setdefault(id(job.dataset), ray.put(job.dataset))
        submitted_at = time.time()
        reference = train_task.options(
            num_cpus=1,
            num_gpus=job.spec.gpus_per_job or 0,
            # A dead worker fails the job rather than silently training it twice.
            max_retries=0,
            name=f"runjobs:{job.id}",
        ).remote(job.spec, dataset_ref, submitted_at)
        submitted[reference] = (job, submitted_at)

    records: dict[str, dict[str, Any]] = {}
    pending = list(submitted)

    def finish(reference: Any, record: dict[str, Any]) -> None:
        job, submitted_at = submitted[reference]
        record["timings"]["total_s"] = time.time() - submitted_at
        records[job.id] = record
        on_record(record)

    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for reference in ready:
                job = submitted[reference][0]
                try:
                    record = job_record(job, "succeeded", None, ray.get(reference))
                except RayTaskError as error:
                    record = job_record(job, "failed", describe_task_error(error), {})
                except RayError as error:  # the worker or its node died
                    record = job_record(job, "failed", f"{type(error).__name__}: {error}", {})
                finish(reference, record)
    except KeyboardInterrupt:
        # Ctrl-C: stop what is still running, record it as cancelled, keep what finished.
        for reference in pending:
            ray.cancel(reference, force=True)
            job = submitted[reference][0]
            finish(reference, job_record(job, "cancelled", "cancelled: the run was interrupted", {}))
        raise RunInterrupted([records[job.id] for job in jobs]) from None
    return [records[job.id] for job in jobs]


class RunInterrupted(KeyboardInterrupt):
    """The run was interrupted; `records` holds every job, finished or cancelled."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__("interrupted")
        self.records = records


def job_record(job: PlannedJob, status: str, error: str | None, result: dict[str, Any]) -> dict[str, Any]:
    spec = job.spec
    record: dict[str, Any] = {
        "id": job.id,
        "framework": spec.framework,
        "variant": spec.variant,
        "workers": spec.workers,
        "config": spec.to_record(),
        "status": status,
        "error": error,
        "convergence": None,
        "params": None,
        "reference": None,
        "loss": None,
        "predictions": [],
        "timings": {},
        "placement": None,
        "versions": None,
    }
    record.update(result)
    return record


def describe_task_error(error: Exception) -> str:
    """The original exception's type and message, without Ray's traceback framing."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
