"""What `runjobs status`, `list` and `show` print: read from a run's ledger, never from Ray."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from jobs.record.ledger import Ledger, LedgerError


def run_status(directory: Path) -> dict[str, Any]:
    with Ledger.open(directory, for_writing=False) as ledger:
        meta = ledger.meta()
        jobs = ledger.summaries()
        counts = ledger.counts()
    started = meta.get("started_at") or time.time()
    finished = meta.get("finished_at")
    durations = [job["total_s"] for job in jobs if job["status"] == "succeeded" and job["total_s"]]
    running = [job["id"] for job in jobs if job["status"] == "running"]
    left = counts["pending"] + counts["running"]
    eta = None
    if left and durations and not finished:
        # Jobs left, at the pace finished jobs ran, as many at once as are running now.
        eta = statistics.mean(durations) * left / max(len(running), 1)
    return {
        "run_id": meta.get("run_id"),
        "jobs": len(jobs),
        "counts": counts,
        "running": running,
        "finished": finished is not None,
        "elapsed_s": (finished or time.time()) - started,
        "eta_s": eta,
        # Under a stopping rule: each running job's latest reported [epoch, loss].
        "progress": {
            job_id: report for job_id, report in (meta.get("progress") or {}).items() if job_id in running
        },
    }


def job_rows(directory: Path) -> list[dict[str, Any]]:
    with Ledger.open(directory, for_writing=False) as ledger:
        jobs = ledger.summaries()
    return [
        {
            "id": job["id"],
            "state": job["status"],
            "attempts": job["attempts"],
            "convergence": job["convergence"],
            "train_s": round(job["train_s"], 4) if job["train_s"] is not None else None,
        }
        for job in jobs
    ]


def job_detail(directory: Path, job_id: str) -> dict[str, Any]:
    with Ledger.open(directory, for_writing=False) as ledger:
        job = ledger.job(job_id)
        if job is None:
            known = ledger.job_ids()
            listed = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise LedgerError(f"no job {job_id!r} in {directory}; its jobs are: {listed}")
    return {
        "id": job.id,
        "state": job.status,
        "attempts": job.attempts,
        "config": job.config,
        "record": job.record,
    }
