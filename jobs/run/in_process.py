"""The in-process executor: every job in this process, one after another, without Ray.

For tests of everything around the run (the pipeline, the ledger, the reports, cancel)
that need real training but not a cluster, as submitit's local executor serves its
tests. It runs single-device CPU jobs only: a multi-device variant needs its own
processes (and a GPU job a device from Ray); `resolve` refuses the rest. A cancel
request stops it between jobs, as a timeout cannot be enforced on a job running in
this very process.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobs.plan.planning import PlannedJob, resolve_for_cluster
from jobs.plan.stopping_rule import StoppingRule
from jobs.run.cluster import ResourceRequestError
from jobs.run.driver import RunInterrupted, describe_error, merge_worker_results, planned_outcome
from jobs.run.executor import JobFeed, RunCallbacks, RunSummary
from jobs.run.stopping import StoppingPolicy

CLUSTER = {"address": "in-process", "embedded": True, "nodes": 1, "cpus": 1.0, "gpus": 0.0}


class PolicyMonitor:
    """A job's reports judged at once by the run's stopping policy: one process needs no board."""

    def __init__(self, policy: StoppingPolicy, job_id: str) -> None:
        self.policy = policy
        self.job_id = job_id
        self.reason: str | None = None

    def report(self, epochs_done: int, loss: float) -> bool:
        self.reason = self.reason or self.policy.observe(self.job_id, epochs_done, loss)
        return self.reason is not None


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
        self,
        jobs: list[PlannedJob],
        callbacks: RunCallbacks,
        run_id: str,
        feed: JobFeed | None = None,
        stopping: StoppingRule | None = None,
    ) -> RunSummary:
        from workers.entry import run_job

        policy = StoppingPolicy(stopping) if stopping is not None else None
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
            training_job, monitor = job.spec.for_worker(), None
            if policy is not None and job.spec.variant == "single":
                training_job = dataclasses.replace(training_job, report_every=stopping.every)
                monitor = PolicyMonitor(policy, job.id)
            try:
                result = merge_worker_results(
                    [run_job(training_job, job.dataset, submitted_at, monitor=monitor)]
                )
                if result.get("stopped"):
                    result["stopped"].update(reason=monitor.reason, rule=stopping.described())
                outcome = planned_outcome(
                    job, "stopped" if result.get("stopped") else "succeeded", None, result
                )
            except Exception as error:
                logs = getattr(error, "runjobs_logs", None)
                extra = {"logs": [{"rank": 0, **logs}]} if logs else {}
                outcome = planned_outcome(job, "failed", describe_error(error), extra)
            outcome.record["timings"]["total_s"] = time.time() - submitted_at
            if policy is not None:
                policy.ended(
                    job.id,
                    (outcome.record.get("loss") or {}).get("history"),
                    outcome.record.get("history_epochs"),
                )
            callbacks.on_record(outcome, False)
        return RunSummary(CLUSTER, {"jobs_s": time.perf_counter() - started})
