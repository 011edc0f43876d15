"""The Ray actor behind each worker of a multiworker or ddp job.

The driver starts one per worker inside the job's placement group, asks each for an
address its peers can reach, then hands every worker its `WorkerContext` and the job.
"""

from __future__ import annotations

from typing import Any

from workers.data import Dataset
from workers.distributed import WorkerContext, reserve_address
from workers.entry import run_job


class DistributedWorker:
    def address(self) -> str:
        return reserve_address()

    def run(self, spec, dataset: Dataset, submitted_at: float, context: WorkerContext) -> dict[str, Any]:
        return run_job(spec, dataset, submitted_at, context)
