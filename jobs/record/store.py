"""Keeping an ended job: its output and model files first, then its record in the ledger.

A record arrives with its logs and model files beside it (a job's whole outcome, as its
worker sent it); once this returns, the job's result is durable: a driver killed the
next moment loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from jobs.record.ledger import Ledger
from jobs.record.models import store_job_model
from jobs.record.output import write_job_logs
from jobs.record.records import JobOutcome


def keep_record(output_dir: Path, ledger: Ledger, outcome: JobOutcome) -> None:
    """Make an ended job durable: its output and model files first, then its record in the ledger."""
    write_job_logs(output_dir, outcome.id, outcome.logs)
    record = outcome.record
    # Model files go to DIR/models/JOB before the record (which names them) is durable.
    model = store_job_model(output_dir, outcome.id, outcome.model_files)
    if model is not None:
        # The record's `model` describes what was trained; the saved files join it.
        record = {**record, "model": {**(record.get("model") or {}), **model}}
    ledger.mark(outcome.id, outcome.status, record)
