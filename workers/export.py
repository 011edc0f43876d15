"""A trained job's model as files other programs can load, in every format its framework exports.

The formats, their file names and who writes them are the registry's
(workers/frameworks/__init__.py): TensorFlow writes a SavedModel and a .keras file,
torch TorchScript and a state_dict, both ONNX when the optional converters are
installed. This module writes the manifest beside them and leaves the files to the
framework's `export_model`.

The model is rebuilt from the job's learned parameters in the data's own units, not taken
from the trainer: a `--normalize` job trained on standardised data, but every layer of a
dense stack is affine before its activation, so folding the scaling into the first and
last layers is exact and the exported model needs no scaling layer. A user model's
parameters cannot be folded (its code is not a known stack): it is exported in the
units it was trained in, which the manifest's `units` says. Every format takes float32
inputs of shape [rows, feature_count] and returns [rows, 1].

`model.json` beside the files says what the files hold, so a loader can rebuild a model
from its parameters alone without running any code the files carry:

    framework, job_id, feature_count, features (names), model (linear, mlp or the user
    model's path or module), formats {format: file}, not_written {format: reason};
    a dense stack: layers [{inputs, outputs, activation}], in order; the linear model
    also weights and bias (for a reader); a user model: user_model {name, filename,
    digest, model_args}, and units (original, or standardised when it was trained on
    standardised data and predicts in those units).

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
from workers.models import ACTIVATIONS, DenseLayer, ModelPlan

MANIFEST = "model.json"
# The order in which `runjobs predict` searches a job's model directory when no format is
# asked for: the loaders that need the least first (TorchScript needs no Python class,
# a SavedModel no Keras). Each format's place is its `preference` in the registry.
FORMAT_PREFERENCE = frameworks.format_preference()
# A dense layer's activations as the manifest names them: `linear` is none.
LAYER_ACTIVATIONS = ("linear", *ACTIVATIONS)
# The formats whose loader would need a user model's code (a state_dict) or would have to
# run the graph the file carries (a SavedModel): runjobs predict refuses them for a user model.
# A user model's files in these formats need its code (or, for a SavedModel, its graph) to
# load: `runjobs predict` refuses them unless --trust-code.
NEEDS_USER_CODE = ("state_dict", "saved_model", "jax_params")
UNITS = ("original", "standardised")


def export_model(
    framework: str,
    plan: ModelPlan,
    parameters: list[np.ndarray],
    directory: Path | str,
    feature_names: list[str] | None = None,
    job_id: str | None = None,
    units: str | None = None,
) -> list[str]:
    """Write the model `plan` with `parameters` (canonical layout) in `framework`'s formats.

    The parameters are in the data's units, except a user model's trained with
    `--normalize`: pass `units="standardised"` for it, and the manifest says so. Returns
    the formats written. A format that is optional and cannot be written here (ONNX
    without its converter; a user model Keras cannot save) is skipped and recorded in
    the manifest's `not_written` with the reason; a core format that fails raises,
    since the job was asked for its model.
    """
    formats = frameworks.formats(framework)  # refuses an unknown framework, naming the known ones
    if units is not None and units not in UNITS:
        raise ValueError(f"units={units!r}: choose one of {', '.join(UNITS)}")
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
    if plan.user is None:
        manifest["layers"] = [
            {"inputs": layer.inputs, "outputs": layer.outputs, "activation": layer.activation}
            for layer in plan.layers
        ]
    else:
        manifest["user_model"] = {
            "name": plan.user.name,
            "filename": plan.user.filename,
            "digest": plan.user.digest,
            "model_args": {str(key): value for key, value in plan.arguments},
        }
        manifest["units"] = units or "original"
    if plan.is_linear:
        # For a reader; predictions come from the model files. Non-finite values (a
        # diverged job) are null, so the manifest stays strict JSON.
        weights = [float(value) for value in np.asarray(parameters[0]).reshape(-1)]
        bias = float(np.asarray(parameters[1]).reshape(-1)[0])
        manifest["weights"] = [value if math.isfinite(value) else None for value in weights]
        manifest["bias"] = bias if math.isfinite(bias) else None
    # model_args are the user's (YAML values): anything JSON cannot hold is written as text.
    text = json.dumps(manifest, indent=2, default=str)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")
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


# ---- what a loader reads from the manifest beside a model file ------------------------------


def manifest_beside(path: Path) -> dict[str, Any] | None:
    """The model.json of the job directory that holds model file (or SavedModel directory) `path`.

    None when there is none: a model file copied on its own. One that cannot be read is
    refused (workers.frameworks.base.ModelLoadError), as it would be by `runjobs predict`.
    """
    from workers.frameworks.base import ModelLoadError

    where = Path(path).parent / MANIFEST
    if not where.is_file():
        return None
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(f"{where} cannot be read as JSON ({detail}); export the model again") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{where} holds a JSON {type(manifest).__name__}, not an object")
    return manifest


def manifest_layers(manifest: dict[str, Any] | None, where: Path | str) -> tuple[DenseLayer, ...] | None:
    """The dense stack the manifest describes (its `layers`), or None when it names none.

    Refused (ModelLoadError, naming `where`) unless every layer has whole `inputs` and
    `outputs`, an activation runjobs builds (linear, relu, tanh, gelu), each layer takes
    what the one before gives, the first takes the feature count and the last gives one value.
    """
    from workers.frameworks.base import ModelLoadError

    if manifest is None or manifest.get("layers") is None:
        return None
    described = manifest["layers"]
    shape = "layers must be a list of {inputs, outputs, activation}"
    if not isinstance(described, list) or not described:
        raise ModelLoadError(f"{where}: {shape}; export the model again (runjobs submit --save-models)")
    layers = []
    for index, layer in enumerate(described):
        if not isinstance(layer, dict):
            raise ModelLoadError(f"{where}: layer {index} is not an object; {shape}")
        sizes = [layer.get("inputs"), layer.get("outputs")]
        if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
            raise ModelLoadError(f"{where}: layer {index} needs whole inputs and outputs above 0; {shape}")
        activation = layer.get("activation", "linear")
        if activation not in LAYER_ACTIVATIONS:
            raise ModelLoadError(
                f"{where}: layer {index} has activation {activation!r}; runjobs builds "
                f"{', '.join(LAYER_ACTIVATIONS)}"
            )
        layers.append(DenseLayer(sizes[0], sizes[1], activation))
    for index, (before, after) in enumerate(zip(layers[:-1], layers[1:])):
        if before.outputs != after.inputs:
            raise ModelLoadError(
                f"{where}: layer {index} gives {before.outputs} values but layer {index + 1} takes "
                f"{after.inputs}; {shape}"
            )
    feature_count = manifest.get("feature_count")
    if isinstance(feature_count, int) and feature_count != layers[0].inputs:
        raise ModelLoadError(
            f"{where}: feature_count is {feature_count} but the first layer takes {layers[0].inputs}"
        )
    if layers[-1].outputs != 1:
        raise ModelLoadError(
            f"{where}: the last layer gives {layers[-1].outputs} values; runjobs models give 1"
        )
    return tuple(layers)


def manifest_user_model(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's `user_model` {name, filename, digest, model_args}, or None for a built-in model."""
    if manifest is None or not isinstance(manifest.get("user_model"), dict):
        return None
    return manifest["user_model"]


def user_model_file(user_model: dict[str, Any]) -> str:
    """How messages name a user model: the file its code came from, else the name the job gave."""
    return str(user_model.get("filename") or user_model.get("name") or "the user's model code")


def readable_instead(path: Path, manifest: dict[str, Any], refused: str) -> str:
    """The files beside `path` that `runjobs predict` reads without a user model's code, for a refusal."""
    formats = manifest.get("formats") if isinstance(manifest.get("formats"), dict) else {}
    directory = Path(path).parent
    others = [
        str(directory / file_name)
        for name, file_name in formats.items()
        if name != refused and name not in NEEDS_USER_CODE and isinstance(file_name, str)
    ]
    return " or ".join(others) if others else "a format that needs no code (TorchScript or ONNX)"


def onnx_mismatch(path: Path, feature_count: int, compute: Any) -> str | None:
    """Why the ONNX file a converter wrote at `path` is not the model `compute` runs, or None when it is.

    A converter may write a graph with an op onnxruntime does not have (tf2onnx leaves
    Keras's gelu as Erfc, for one) or that computes something else, and says so only in
    its log. onnxruntime runs the file on a few rows and its outputs are compared with
    `compute`'s (float32 [rows, K] -> [rows, 1]). Without onnxruntime nothing is checked.
    """
    try:
        import onnxruntime
    except ImportError:
        return None
    features = np.random.default_rng(0).uniform(-2.0, 2.0, size=(5, feature_count)).astype(np.float32)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.asarray(session.run(None, {session.get_inputs()[0].name: features})[0], dtype=np.float64)
    except Exception as error:  # onnxruntime's errors have no common base
        lines = [line for line in str(error).splitlines() if line.strip()]
        return f"onnxruntime cannot run ({type(error).__name__}: {lines[0] if lines else ''})"
    expected = np.asarray(compute(features), dtype=np.float64).reshape(-1)
    got = got.reshape(-1)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
        return "computes something else than the model on 5 rows"
    return None
