"""A trained job's model as files other programs can load, in every format its framework exports.

The formats, their file names and who writes them are the registry's
(workers/frameworks/__init__.py): TensorFlow writes a SavedModel and a .keras file,
torch TorchScript and a state_dict, both ONNX when the optional converters are
installed. This module writes the manifest beside them and leaves the files to the
framework's `export_model`.

The model is rebuilt from the job's learned parameters in the data's own units, not taken
from the trainer: a `--normalize` job trained on standardised data, but every layer of a
dense stack is affine before its activation, so folding the scaling into the first and
last layers is exact and the exported model needs no scaling layer. Every format takes float32
inputs of shape [rows, feature_count] and returns [rows, 1].

`model.json` beside the files names the framework, the feature count and names, and
each format's file, and records a format that was not written with the reason (ONNX
needs the optional converters: `pip install 'runjobs[onnx]'`).

Importing this module imports no framework (the registry imports one only when
`export_model` needs it), so the driver and `runjobs predict` can read its names
without TensorFlow or torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from workers import frameworks
from workers.models import ModelPlan

MANIFEST = "model.json"
# The order in which `runjobs predict` searches a job's model directory when no format is
# asked for: the loaders that need the least first (TorchScript needs no Python class,
# a SavedModel no Keras). Each format's place is its `preference` in the registry.
FORMAT_PREFERENCE = frameworks.format_preference()


def export_model(
    framework: str,
    plan: ModelPlan,
    parameters: list[np.ndarray],
    directory: Path | str,
    feature_names: list[str] | None = None,
    job_id: str | None = None,
) -> list[str]:
    """Write the model `plan` with `parameters` (canonical layout, data units) in `framework`'s formats.

    Returns the formats written. A format that is optional and cannot be written here
    (ONNX without its converter) is skipped and recorded in the manifest's `not_written`
    with the reason; a core format that fails raises, since the job was asked for its model.
    """
    formats = frameworks.formats(framework)  # refuses an unknown framework, naming the known ones
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    feature_count = plan.feature_count
    if feature_count == 0:
        raise ValueError("a model needs at least one feature")
    not_written = frameworks.get(framework).export_model(plan, parameters, directory)
    written = [name for name in formats if name not in not_written]
    manifest: dict[str, Any] = {
        "framework": framework,
        "job_id": job_id,
        "model": plan.name,
        "feature_count": feature_count,
        "features": list(feature_names) if feature_names else [f"x{index}" for index in range(feature_count)],
        "formats": {name: frameworks.format_file(name) for name in written},
        "not_written": not_written,
    }
    if plan.is_linear:
        # For a reader; predictions come from the model files. Non-finite values (a
        # diverged job) are null, so the manifest stays strict JSON.
        weights = [float(value) for value in np.asarray(parameters[0]).reshape(-1)]
        bias = float(np.asarray(parameters[1]).reshape(-1)[0])
        manifest["weights"] = [value if math.isfinite(value) else None for value in weights]
        manifest["bias"] = bias if math.isfinite(bias) else None
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return written


def export_linear(
    framework: str,
    weights: list[float],
    bias: float,
    directory: Path | str,
    feature_names: list[str] | None = None,
    job_id: str | None = None,
) -> list[str]:
    """export_model for the linear model y = x . weights + bias."""
    from workers.models import dense_stack

    weights = [float(value) for value in weights]
    if not weights:
        raise ValueError("a model needs at least one weight")
    plan = dense_stack("linear", len(weights), (), "linear")
    parameters = [np.asarray(weights, dtype=np.float64).reshape(-1, 1), np.asarray([float(bias)])]
    return export_model(framework, plan, parameters, directory, feature_names, job_id)


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
