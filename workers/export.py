"""A trained job's model as files other programs can load: SavedModel, .keras, TorchScript, state_dict, ONNX.

The model is rebuilt from the job's learned parameters in the data's own units (the
result's `params`), not taken from the trainer: a `--normalize` job trained on
standardised data, but the model is linear, so folding the scaling into the weights and
bias is exact and the exported model needs no scaling layer. Every format takes float32
inputs of shape [rows, feature_count] and returns [rows, 1].

`model.json` beside the files names the framework, the feature count and names, and
each format's file, and records a format that was not written with the reason (ONNX
needs the optional converters: `pip install 'runjobs[onnx]'`).

This module imports its framework only inside the functions that need it, so the
driver and `runjobs predict` can read its names without TensorFlow or torch.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

MANIFEST = "model.json"
# Each format's file (or directory, for the SavedModel) inside a job's model directory.
FORMAT_FILES = {
    "torchscript": "model.torchscript.pt",
    "saved_model": "saved_model",
    "keras": "model.keras",
    "state_dict": "state_dict.pt",
    "onnx": "model.onnx",
}
# The order in which `runjobs predict` searches a job's model directory when no format is
# asked for: the loaders that need the least first (TorchScript needs no Python class,
# a SavedModel no Keras).
FORMAT_PREFERENCE = ("torchscript", "saved_model", "keras", "state_dict", "onnx")
FRAMEWORK_FORMATS = {
    "tensorflow": ("saved_model", "keras", "onnx"),
    "torch": ("torchscript", "state_dict", "onnx"),
}
# The opset both converters write; onnxruntime 1.17 and later run it.
ONNX_OPSET = 18
ONNX_INSTALL_HINT = "pip install 'runjobs[onnx]'"


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
    if framework not in FRAMEWORK_FORMATS:
        raise ValueError(f"framework={framework!r}: choose one of {', '.join(FRAMEWORK_FORMATS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = [float(value) for value in weights]
    feature_count = len(weights)
    if feature_count == 0:
        raise ValueError("a model needs at least one weight")
    exporter = _export_tensorflow if framework == "tensorflow" else _export_torch
    not_written = exporter(weights, float(bias), directory)
    written = [name for name in FRAMEWORK_FORMATS[framework] if name not in not_written]
    manifest = {
        "framework": framework,
        "job_id": job_id,
        "feature_count": feature_count,
        "features": list(feature_names) if feature_names else [f"x{index}" for index in range(feature_count)],
        "formats": {name: FORMAT_FILES[name] for name in written},
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


def _export_tensorflow(weights: list[float], bias: float, directory: Path) -> dict[str, str]:
    import keras
    import numpy as np
    import tensorflow as tf

    feature_count = len(weights)
    model = keras.Sequential(
        [keras.Input((feature_count,), dtype="float32", name="features"), keras.layers.Dense(1)]
    )
    model.layers[0].set_weights(
        [np.asarray(weights, dtype=np.float32).reshape(feature_count, 1), np.asarray([bias], np.float32)]
    )
    model.save(directory / FORMAT_FILES["keras"])
    # Keras 3's export writes a SavedModel whose `serving_default` signature takes
    # float32 [None, K] under the input's name, `features`.
    model.export(str(directory / FORMAT_FILES["saved_model"]), format="tf_saved_model", verbose=False)

    missing = _missing_modules("onnx", "tf2onnx")
    if missing:
        return {"onnx": f"needs {', '.join(missing)}: {ONNX_INSTALL_HINT}"}
    try:
        import tf2onnx

        # tf2onnx's from_keras does not know Keras 3 models; a tf.function around the
        # model converts the same graph.
        signature = (tf.TensorSpec((None, feature_count), tf.float32, name="features"),)
        serve = tf.function(lambda features: model(features), input_signature=signature)
        tf2onnx.convert.from_function(
            serve,
            input_signature=signature,
            opset=ONNX_OPSET,
            output_path=str(directory / FORMAT_FILES["onnx"]),
        )
    except Exception as error:  # an optional converter's failure must not lose the job
        return {"onnx": f"tf2onnx failed: {_one_line(error)}"}
    return {}


def _export_torch(weights: list[float], bias: float, directory: Path) -> dict[str, str]:
    import torch

    feature_count = len(weights)
    model = torch.nn.Linear(feature_count, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights], dtype=torch.float32))
        model.bias.copy_(torch.tensor([bias], dtype=torch.float32))
    model.eval()
    # TorchScript: code and tensors only, so loading it runs no pickled Python objects.
    torch.jit.script(model).save(str(directory / FORMAT_FILES["torchscript"]))
    torch.save(model.state_dict(), directory / FORMAT_FILES["state_dict"])

    # torch 2.13's exporter (dynamo, the default) builds the graph with onnxscript.
    missing = _missing_modules("onnx", "onnxscript")
    if missing:
        return {"onnx": f"needs {', '.join(missing)}: {ONNX_INSTALL_HINT}"}
    try:
        torch.onnx.export(
            model,
            (torch.zeros(1, feature_count),),
            str(directory / FORMAT_FILES["onnx"]),
            input_names=["features"],
            output_names=["prediction"],
            dynamic_shapes=({0: torch.export.Dim("rows")},),
            opset_version=ONNX_OPSET,
            external_data=False,  # one self-contained file
            verbose=False,
        )
    except Exception as error:  # an optional converter's failure must not lose the job
        return {"onnx": f"torch.onnx.export failed: {_one_line(error)}"}
    return {}


def _missing_modules(*names: str) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _one_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
