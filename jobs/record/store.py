"""Keeping an ended job: its output and model files first, then its record in the ledger.

A record arrives with its logs and model files beside it (a job's whole outcome, as its
worker sent it); once this returns, the job's result is durable: a driver killed the
next moment loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.record.ledger import Ledger
from jobs.record.models import store_job_model
from jobs.record.output import write_job_logs


def keep_record(output_dir: Path, ledger: Ledger, record: dict[str, Any]) -> None:
    """Make an ended job's record durable: its logs and model files first, then the ledger."""
    write_job_logs(output_dir, record["id"], record.pop("logs", None) or [])
    # Model files go to DIR/models/JOB before the record (which names them) is durable.
    store_job_model(output_dir, record)
    ledger.mark(record["id"], record["status"], record)
