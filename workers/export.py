"""A trained job's model as files other programs can load, in every format its framework exports.

The formats, their file names and who writes them are the registry's
(workers/frameworks/__init__.py): TensorFlow writes a SavedModel and a .keras file,
torch TorchScript and a state_dict, both ONNX when the optional converters are
installed. This module writes the manifest beside them and leaves the files to the
framework's `export_model`.

The model is rebuilt from the job's learned parameters in the data's own units (the
result's `params`), not taken from the trainer: a `--normalize` job trained on
standardised data, but the model is linear, so folding the scaling into the weights and
bias is exact and the exported model needs no scaling layer. Every format takes float32
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

from workers import frameworks

MANIFEST = "model.json"
# The order in which `runjobs predict` searches a job's model directory when no format is
# asked for: the loaders that need the least first (TorchScript needs no Python class,
# a SavedModel no Keras). Each format's place is its `preference` in the registry.
FORMAT_PREFERENCE = frameworks.format_preference()


def export_model(
    framework: str,
    weights: list[float],
    bias: float,
    directory: Path | str,
    feature_names: list[str] | None = None,
    job_id: str | None = None,
) -> list[str]:
    """Write the linear model y = x . weights + bias in `framework`'s formats; return the formats written.

    A format that is optional and cannot be written here (ONNX without its converter)
    is skipped and recorded in the manifest's `not_written` with the reason; a core
    format that fails raises, since the job was asked for its model.
    """
    formats = frameworks.formats(framework)  # refuses an unknown framework, naming the known ones
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = [float(value) for value in weights]
    feature_count = len(weights)
    if feature_count == 0:
        raise ValueError("a model needs at least one weight")
    not_written = frameworks.get(framework).export_model(weights, float(bias), directory)
    written = [name for name in formats if name not in not_written]
    manifest = {
        "framework": framework,
        "job_id": job_id,
        "feature_count": feature_count,
        "features": list(feature_names) if feature_names else [f"x{index}" for index in range(feature_count)],
        "formats": {name: frameworks.format_file(name) for name in written},
        "not_written": not_written,
        # For a reader; predictions come from the model files. Non-finite values (a
        # diverged job) are null, so the manifest stays strict JSON.
        "weights": [value if math.isfinite(value) else None for value in weights],
        "bias": float(bias) if math.isfinite(bias) else None,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return written


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
