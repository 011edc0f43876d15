"""The Ray actors that run jobs: a gang worker of a multiworker or ddp job, and a warm worker.

A gang worker: the driver starts one per worker inside the job's placement group, asks
each for an address its peers can reach, then hands every worker its `WorkerContext` and
the job. A warm worker: one framework, many single-device CPU jobs in turn.
"""

from __future__ import annotations

from typing import Any

from workers.data import Dataset
from workers.distributed import WorkerContext, reserve_address
from workers.entry import run_job
from workers.reporting import TrainingMonitor


class DistributedWorker:
    def address(self) -> str:
        return reserve_address()

    def run(
        self,
        spec,
        dataset: Dataset,
        submitted_at: float,
        context: WorkerContext,
        monitor: TrainingMonitor | None = None,
    ) -> dict[str, Any]:
        return run_job(spec, dataset, submitted_at, context, monitor=monitor)


class WarmWorker:
    """A process that keeps one framework imported and runs that framework's jobs one after another.

    The driver gives it only single-device CPU jobs of one framework, so the framework's
    import and runtime start are paid once per worker rather than once per job. The
    first job's start-up includes them; the later jobs' start-up is near zero.
    """

    def run(
        self, spec, dataset: Dataset, submitted_at: float, monitor: TrainingMonitor | None = None
    ) -> dict[str, Any]:
        return run_job(spec, dataset, submitted_at, monitor=monitor)
