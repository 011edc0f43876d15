"""What a job's run hands back and the ledger keeps: the record, its shape declared once.

A record is a plain JSON-ready dict (report.json's `jobs[]` entries are records), so
every stage can read it without Ray or a framework. The run stage builds records, the
record stage keeps them, the report stage reads them: all three import this module, and
it imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

STATES = ("pending", "running", "succeeded", "stopped", "failed", "cancelled")
# `stopped`: ended early by the run's stopping rule (jobs/run/stopping.py), with its
# partial history: what the rule asked for, not a failure.
FINAL_STATES = ("succeeded", "stopped", "failed", "cancelled")
# The states a run may end with and still exit 0.
GOOD_STATES = ("succeeded", "stopped")


def empty_record(job_id: str, config: dict[str, Any], status: str, error: str | None) -> dict[str, Any]:
    """A job record with its identity, config and status, and no results yet."""
    return {
        "id": job_id,
        "framework": config["framework"],
        "variant": config["variant"],
        "workers": config["workers"],
        "world_size": config["workers"],
        "config": config,
        "status": status,
        "error": error,
        "convergence": None,
        # The model's name, parameter count, dtype, start and update rule; with --save-models
        # also where its files are (path, formats).
        "model": None,
        "params": None,
        "reference": None,
        "loss": None,
        "history": None,
        "predictions": [],
        "timings": {},
        "placement": None,
        "versions": None,
    }


def record_json(value: Any, indent: bool = False) -> bytes:
    """A record (or any JSON-ready value) as compact JSON: every non-finite float as null, as
    finite_only makes it; numpy scalars as numbers. orjson: a 10,000-job sweep's records take
    a second where the standard library takes five."""
    options = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_plain_number, option=options)


def _plain_number(value: Any) -> Any:
    if isinstance(value, float):  # a float subclass orjson does not take as it is
        return float(value)
    if isinstance(value, int):
        return int(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def finite_only(value: Any) -> Any:
    """A copy of `value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_only(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if value and type(value[0]) is float:
            # A series of numbers (a loss history): summed in C, it is finite when every
            # value is (a sum that overflows, or a None or text among them, takes the long way).
            try:
                if math.isfinite(sum(value)):
                    return list(value)
            except TypeError:
                pass
        return [finite_only(item) for item in value]
    return value


def exit_code_for(report: dict[str, Any]) -> int:
    """0 when every job of a report succeeded or was stopped by its rule, 1 when any did not."""
    summary = report["summary"]
    return 0 if summary["succeeded"] + summary.get("stopped", 0) == len(report["jobs"]) else 1


@dataclass
class JobOutcome:
    """An ended job as its run hands it back: the record the ledger keeps, and beside it
    what is kept as files: each worker's captured output and the exported model's files."""

    record: dict[str, Any]
    logs: list[dict[str, Any]] = field(default_factory=list)  # per rank: {rank, stdout, stderr}
    model_files: dict[str, bytes] = field(default_factory=dict)  # relative path -> content

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def status(self) -> str:
        return self.record["status"]


# What a worker's result carries besides the record's fields (workers/entry.py).
RESULT_FILES = ("logs", "model_files")


def job_outcome(
    job_id: str, config: dict[str, Any], status: str, error: str | None, result: dict[str, Any]
) -> JobOutcome:
    """The outcome of an ended job from what its workers returned; the files go beside the record."""
    record = empty_record(job_id, config, status, error)
    record.update({key: value for key, value in result.items() if key not in (*RESULT_FILES, "rank")})
    return JobOutcome(record, list(result.get("logs") or []), dict(result.get("model_files") or {}))
