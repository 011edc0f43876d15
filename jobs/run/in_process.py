"""The in-process executor: every job in this process, one after another, without Ray.

For tests of everything around the run (the pipeline, the ledger, the reports, cancel)
that need real training but not a cluster, as submitit's local executor serves its
tests. It runs single-device CPU jobs only: a multi-device variant needs its own
processes (and a GPU job a device from Ray); `resolve` refuses the rest. A cancel
request stops it between jobs, as a timeout cannot be enforced on a job running in
this very process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobs.plan.planning import PlannedJob, resolve_for_cluster
from jobs.run.cluster import ResourceRequestError
from jobs.run.driver import RunInterrupted, describe_error, merge_worker_results, planned_outcome
from jobs.run.executor import JobFeed, RunCallbacks, RunSummary

CLUSTER = {"address": "in-process", "embedded": True, "nodes": 1, "cpus": 1.0, "gpus": 0.0}


class InProcessExecutor:
    @contextmanager
    def connect(self) -> Iterator[InProcessSession]:
        yield InProcessSession()

    def closed(self) -> float | None:
        return None


class InProcessSession:
    cluster: dict[str, Any] = CLUSTER

    def resolve(self, job: PlannedJob) -> PlannedJob:
        resolved = resolve_for_cluster(job, cluster_has_gpus=False)
        if resolved.spec.variant != "single" or resolved.spec.gpus_per_job:
            raise ResourceRequestError(
                f"job {job.id}: the in-process executor runs single-device CPU jobs only; "
                "run multi-device and GPU jobs on Ray (without an in-process executor)"
            )
        return resolved

    def recover(self, meta: dict[str, Any], callbacks: RunCallbacks) -> None:
        """Nothing to recover: the ledger holds every result this executor finished."""

    def run(
        self, jobs: list[PlannedJob], callbacks: RunCallbacks, run_id: str, feed: JobFeed | None = None
    ) -> RunSummary:
        from workers.entry import run_job

        started = time.perf_counter()
        jobs = list(jobs)
        index = 0
        while index < len(jobs) or (feed is not None and not feed.exhausted()):
            if index == len(jobs):
                jobs += feed.take()
                if index == len(jobs):
                    break  # a feed that is not exhausted yet gave nothing to wait for
            job = jobs[index]
            index += 1
            if callbacks.should_stop():
                for waiting in jobs[index - 1 :]:
                    cancelled = planned_outcome(waiting, "cancelled", "cancelled: runjobs cancel", {})
                    cancelled.record["timings"]["total_s"] = 0.0
                    callbacks.on_record(cancelled, False)
                interrupted = RunInterrupted(0, len(jobs) - index + 1, requested=True)
                return RunSummary(CLUSTER, {"jobs_s": time.perf_counter() - started}, interrupted)
            callbacks.on_start(job.id, False)
            submitted_at = time.time()
            try:
                result = merge_worker_results([run_job(job.spec.for_worker(), job.dataset, submitted_at)])
                outcome = planned_outcome(job, "succeeded", None, result)
            except Exception as error:
                logs = getattr(error, "runjobs_logs", None)
                extra = {"logs": [{"rank": 0, **logs}]} if logs else {}
                outcome = planned_outcome(job, "failed", describe_error(error), extra)
            outcome.record["timings"]["total_s"] = time.time() - submitted_at
            callbacks.on_record(outcome, False)
        return RunSummary(CLUSTER, {"jobs_s": time.perf_counter() - started})
