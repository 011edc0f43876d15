"""A run's exported models: `DIR/models/JOB/`, one directory per job that saved its model.

A worker exports its job's model (workers/export.py) and sends the files back as bytes
in its result, under `model_files`: on a remote cluster the worker's disk is not the
user's output directory. The driver writes them here before the job's record reaches
the ledger, and the record keeps only where they are and which formats were written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from jobs.record.output import replace_directory
from workers.export import MANIFEST

MODELS_DIRECTORY = "models"


def store_job_model(directory: Path, job_id: str, files: dict[str, bytes]) -> dict[str, Any] | None:
    """Write a job's exported model files to DIR/models/JOB; return what its record keeps of them.

    That is {path (relative to DIR), formats, not_written}, or None when the job exported
    no model. A model that cannot be written (a full disk) returns the error instead: the
    job's result is kept either way.
    """
    if not files:
        return None
    manifest = json.loads(files[MANIFEST]) if MANIFEST in files else {}
    if manifest:
        # The worker does not know the job's id; the manifest names it for a reader.
        manifest["job_id"] = job_id
        files = {**files, MANIFEST: (json.dumps(manifest, indent=2) + "\n").encode()}
    try:
        write_model_files(directory / MODELS_DIRECTORY, job_id, files)
    except (OSError, ValueError) as error:
        return {"path": None, "formats": [], "error": f"{type(error).__name__}: {error}"}
    return {
        "path": f"{MODELS_DIRECTORY}/{job_id}",
        "formats": list(manifest.get("formats", {})),
        "not_written": manifest.get("not_written", {}),
    }


def write_model_files(models_directory: Path, job_id: str, files: dict[str, bytes]) -> Path:
    """Write `files` ({relative path: bytes}) as models_directory/job_id, all at once.

    They are written to a temporary directory beside it and renamed into place, so a
    reader never sees half a model; a model from an earlier run of the job is replaced.
    """
    for name in files:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"model file {name!r} is not a path inside the job's model directory")
    models_directory.mkdir(parents=True, exist_ok=True)
    target = models_directory / job_id

    def fill(directory: Path) -> None:
        for name, content in files.items():
            path = directory.joinpath(*PurePosixPath(name).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())

    replace_directory(target, fill)
    return target
