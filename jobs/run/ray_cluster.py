"""The executor for a Ray cluster this process drives: an embedded local Ray, or one reached by address.

Connecting starts or reaches Ray (jobs/run/cluster.py); the driver (jobs/run/driver.py)
then runs the jobs as Ray tasks and actors from this process. Ray shuts down on a thread
as the block ends, while the pipeline writes the reports (BackgroundShutdown). On a
cluster reached by address, warm workers outlive the run for `keep_warm`
(jobs/run/warm_pool.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobs.plan.planning import PlannedJob, resolve_for_cluster
from jobs.plan.stopping_rule import StoppingRule
from jobs.run import cluster as clusters
from jobs.run.driver import RunInterrupted, run_jobs
from jobs.run.executor import JobFeed, RunCallbacks, RunSummary
from jobs.run.warm_pool import KeepWarm, PoolLease


class RayClusterExecutor:
    def __init__(
        self,
        address: str | None,
        max_concurrent: int | None = None,
        wait_for_nodes: int | None = None,
        keep_warm: KeepWarm | None = None,
    ) -> None:
        self.address = address
        self.max_concurrent = max_concurrent
        self.wait_for_nodes = wait_for_nodes
        self.keep_warm = keep_warm or KeepWarm()
        self.shutdown = clusters.BackgroundShutdown()

    @contextmanager
    def connect(self) -> Iterator[RayClusterSession]:
        started = time.perf_counter()
        with clusters.connected(self.address, self.shutdown, self.wait_for_nodes) as cluster:
            yield RayClusterSession(
                cluster, time.perf_counter() - started, self.max_concurrent, self.keep_warm
            )

    def closed(self) -> float | None:
        return self.shutdown.wait()


class RayClusterSession:
    def __init__(
        self,
        cluster: clusters.ClusterInfo,
        connect_s: float,
        max_concurrent: int | None,
        keep_warm: KeepWarm | None = None,
    ) -> None:
        self.info = cluster
        self.cluster: dict[str, Any] = cluster.to_record()
        self.connect_s = connect_s
        self.max_concurrent = max_concurrent
        self.keep_warm = keep_warm or KeepWarm()

    def resolve(self, job: PlannedJob) -> PlannedJob:
        resolved = resolve_for_cluster(job, self.info.gpus > 0)
        clusters.check_fits(resolved.spec, self.info)
        return resolved

    def recover(self, meta: dict[str, Any], callbacks: RunCallbacks) -> None:
        """Nothing to recover: a local run's ledger already holds every result it finished."""

    def run(
        self,
        jobs: list[PlannedJob],
        callbacks: RunCallbacks,
        run_id: str,
        feed: JobFeed | None = None,
        stopping: StoppingRule | None = None,
    ) -> RunSummary:
        started = time.perf_counter()
        interrupted = None
        try:
            run_jobs(
                jobs,
                callbacks.on_record,
                lambda job_id: callbacks.on_start(job_id, False),
                self.max_concurrent,
                callbacks.should_stop,
                feed,
                stopping,
                callbacks.on_progress,
                callbacks.say,
                PoolLease(self.keep_warm) if self.info.shared else None,
                callbacks.together,
                callbacks.on_pack,
            )
        except RunInterrupted as interruption:
            interrupted = interruption
        timings = {"connect_s": self.connect_s, "jobs_s": time.perf_counter() - started}
        return RunSummary(self.cluster, timings, interrupted)
