"""The output directory of a run: its ledger (jobs/ledger.py) and the report files.

Every report file is written to a temporary name and renamed into place, so a reader
(or a crash) never sees half a file; report.json is written last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import report as reports


class OutputError(ValueError):
    """The output directory cannot be used."""


def check_usable(path: Path) -> None:
    """Refuse, before anything starts, a directory that holds other files or cannot be created."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output {path} is a file; name a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise OutputError(
            f"--output {path} already holds files that are not a runjobs run; "
            "name a new directory or remove it"
        )
    existing = next(parent for parent in [path, *path.parents] if parent.exists())
    if not os.access(existing, os.W_OK):
        raise OutputError(f"--output {path}: {existing} is not writable; name a directory you can write to")


LOGS_DIRECTORY = "logs"


def log_paths(directory: Path, job_id: str) -> list[Path]:
    """A job's kept output files: JOB.out and JOB.err, or one pair per rank."""
    return sorted((directory / LOGS_DIRECTORY).glob(f"{job_id}.*"))


def write_job_logs(directory: Path, job_id: str, logs: list[dict[str, Any]]) -> None:
    """Keep each worker's stdout and stderr as files in the run's logs/ directory."""
    if not logs:
        return
    (directory / LOGS_DIRECTORY).mkdir(exist_ok=True)
    for entry in logs:
        stem = job_id if len(logs) == 1 else f"{job_id}.rank{entry['rank']}"
        write_atomically(directory / LOGS_DIRECTORY / f"{stem}.out", entry.get("stdout", ""))
        write_atomically(directory / LOGS_DIRECTORY / f"{stem}.err", entry.get("stderr", ""))


def write_reports(directory: Path, report: dict[str, Any]) -> None:
    write_atomically(directory / "report.csv", reports.to_csv(report))
    write_atomically(directory / "report.md", reports.to_markdown(report))
    write_atomically(directory / "report.html", render_report_html(report))
    from jobs.tensorboard import write_event_files  # imports TensorBoard's protos only here

    write_event_files(report, directory)  # DIR/tensorboard/JOB, rebuilt whole
    write_report_json(directory, report)


def write_report_json(directory: Path, report: dict[str, Any]) -> None:
    """report.json, the file schedulers read: always written last."""
    write_atomically(directory / "report.json", reports.to_json(report))


def render_report_html(report: dict[str, Any]) -> str:
    """report.html; a page that cannot be rendered says why instead of costing the run report.json."""
    from jobs.html_report import render_html  # imports plotly only here

    try:
        return render_html(report)
    except Exception as error:  # any plotting failure (or plotly missing): the other files stand
        import html

        return (
            '<!DOCTYPE html><html><head><meta charset="utf-8"><title>runjobs report</title></head><body>'
            f"<p>report.html could not be rendered: {html.escape(f'{type(error).__name__}: {error}')}. "
            "report.json, report.csv and report.md hold the results; "
            "`runjobs report DIR` renders it again.</p></body></html>\n"
        )


def replace_directory(target: Path, fill: Callable[[Path], None]) -> None:
    """Make `target` a directory holding what `fill` writes into an empty one, all at once.

    `fill` writes into a temporary directory beside it, which is then renamed into place,
    so a reader never sees half of it; an earlier `target` is replaced.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        fill(temporary)
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            retired = target.with_name(f".{target.name}.{os.getpid()}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
