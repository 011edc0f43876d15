"""The output directory of a run: whether it can be used, each job's kept output, atomic writes.

Every file here is written to a temporary name and renamed into place, so a reader (or
a crash) never sees half a file. The ledger (jobs/record/ledger.py) and the report
files (jobs/report/files.py) live in the same directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class OutputError(ValueError):
    """The output directory cannot be used."""


def check_usable(path: Path) -> None:
    """Refuse, before anything starts, a directory that holds other files or cannot be created.

    The nearest existing ancestor must be a directory this process can create entries
    in. Permission bits alone do not say so (root passes every check on them, /proc and
    read-only mounts refuse anyway), so a probe directory is made there and removed at
    once: the run itself creates its directory only after the cluster is up.
    """
    if "\0" in str(path):
        raise OutputError(f"--output {str(path)!r} holds a NUL character; name another directory")
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"--output {path} is a file; name a new directory")
        if path.is_dir() and any(path.iterdir()):
            raise OutputError(
                f"--output {path} already holds files that are not a runjobs run; "
                "name a new directory or remove it"
            )
        existing = path
        while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
            existing = existing.parent
        if not existing.exists():
            raise OutputError(
                f"--output {path}: {existing} is a broken symbolic link; name another directory"
            )
        if not existing.is_dir():
            raise OutputError(
                f"--output {path}: {existing} is a file, so no directory can be made under it; "
                "name a directory elsewhere"
            )
        probe = tempfile.mkdtemp(prefix=".runjobs-probe-", dir=existing)
    except OSError as error:
        raise OutputError(
            f"--output {path}: cannot create a directory there ({error.strerror or error}); "
            "name a directory you can write to"
        ) from None
    os.rmdir(probe)


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
        # A pack's output is kept under the pack's own name (jobs/run/driver.py, _record_pack).
        stem = entry.get("name") or (job_id if len(logs) == 1 else f"{job_id}.rank{entry['rank']}")
        write_atomically(directory / LOGS_DIRECTORY / f"{stem}.out", entry.get("stdout", ""))
        write_atomically(directory / LOGS_DIRECTORY / f"{stem}.err", entry.get("stderr", ""))


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


def write_atomically(path: Path, text: str | Iterable[str]) -> None:
    """Write `text` (or its parts, in order: a large report is never one string) under a temporary
    name, then rename it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        if isinstance(text, str):
            handle.write(text)
        else:
            handle.writelines(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
