"""The output directory of a run: one file per finished job as it ends, then the reports.

Every file is written to a temporary name and renamed into place, so a reader (or a
crash) never sees half a file. Each job's record is saved the moment the job ends, so
an interrupted run keeps every finished result; report.json is written last and is
what marks a finished run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jobs import report as reports


class OutputError(ValueError):
    """The output directory cannot be used."""


def check_usable(path: Path) -> None:
    """Refuse, before anything starts, a directory that holds files or cannot be created."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output {path} is a file; name a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise OutputError(f"--output {path} already holds files; name a new directory or remove it")
    existing = next(parent for parent in [path, *path.parents] if parent.exists())
    if not os.access(existing, os.W_OK):
        raise OutputError(f"--output {path}: {existing} is not writable; name a directory you can write to")


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path) -> RunDirectory:
        check_usable(path)
        (path / "jobs").mkdir(parents=True, exist_ok=True)
        return cls(path)

    def record_job(self, record: dict[str, Any]) -> None:
        text = json.dumps(reports.finite_only(record), indent=2, allow_nan=False) + "\n"
        write_atomically(self.path / "jobs" / f"{record['id']}.json", text)

    def write_reports(self, report: dict[str, Any]) -> None:
        write_atomically(self.path / "report.csv", reports.to_csv(report))
        write_atomically(self.path / "report.md", reports.to_markdown(report))
        write_atomically(self.path / "report.json", reports.to_json(report))


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
