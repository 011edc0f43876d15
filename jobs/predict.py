"""`runjobs predict`: load an exported model (any format `--save-models` writes) and predict.

MODEL is a job's model directory (`DIR/models/JOB`, with its `model.json`), from which
the first available format is taken (torchscript, saved_model, keras, state_dict, onnx)
unless one is asked for; or one model file or directory: a `.keras` file, a SavedModel
directory, a TorchScript or state_dict `.pt`, or a `.onnx` file.

Loading never unpickles untrusted data: TorchScript archives hold code and tensors,
a state_dict is read with `torch.load(weights_only=True)` (which refuses any object
that is not a tensor or a plain container), `.keras` files are loaded in Keras' safe
mode, and SavedModel and ONNX files are graphs. Only the framework the chosen format
needs is imported.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.capture import captured_output
from workers.export import FORMAT_PREFERENCE, MANIFEST, ONNX_INSTALL_HINT, read_manifest

FORMATS_BY_SUFFIX = {".keras": "keras", ".onnx": "onnx"}
TORCH_SUFFIXES = (".pt", ".pth")


class PredictError(ValueError):
    """The model or the inputs cannot be used; the message says what to give instead."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    format: str
    feature_names: tuple[str, ...] = ()  # from the job's manifest, when there is one


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    feature_count: int | None  # None when the format does not say
    run: Callable[[np.ndarray], Any]  # float32 [rows, K] -> [rows, 1]


def predict(model_path: Path, input_texts: list[str], wanted_format: str | None = None) -> dict[str, Any]:
    """Load the model at `model_path` and predict every input; returns the source and predictions."""
    inputs = parse_inputs(input_texts)
    source = resolve_model(model_path, wanted_format)
    model = load_model(source)
    check_feature_count(model, inputs)
    outputs = np.asarray(model.run(np.asarray(inputs, dtype=np.float32)), dtype=np.float64).reshape(-1)
    return {
        "model": str(source.path),
        "format": source.format,
        # A diverged model predicts NaN; JSON has no NaN, so it is null, as in report.json.
        "predictions": [
            {"input": list(point), "output": float(output) if math.isfinite(output) else None}
            for point, output in zip(inputs, outputs)
        ],
    }


def parse_inputs(texts: list[str]) -> list[tuple[float, ...]]:
    """Each `--input`: `1800`, or `1800,3` for a model of two features."""
    if not texts:
        raise PredictError(
            "give at least one input, e.g. --input 1800 (comma-separated for several features)"
        )
    points = []
    for text in texts:
        try:
            point = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise PredictError(
                f"--input {text!r}: give numbers separated by commas, e.g. --input 1800 or --input 1800,3"
            ) from None
        if not all(math.isfinite(value) for value in point):
            raise PredictError(f"--input {text!r}: every value must be a finite number")
        points.append(point)
    if len({len(point) for point in points}) > 1:
        raise PredictError("every --input must have the same number of values (one per feature)")
    return points


def resolve_model(path: Path, wanted_format: str | None = None) -> ModelSource:
    """Which file to load, and as what, without importing any framework."""
    if wanted_format is not None and wanted_format not in FORMAT_PREFERENCE:
        raise PredictError(f"--format {wanted_format}: choose one of {', '.join(FORMAT_PREFERENCE)}")
    if not path.exists():
        raise PredictError(
            f"{path} does not exist; name a job's model directory (DIR/models/JOB, written by "
            "runjobs submit --save-models) or a model file"
        )
    if path.is_dir() and (path / MANIFEST).is_file():
        return _from_job_directory(path, wanted_format)
    if path.is_dir() and (path / "models").is_dir():
        jobs = sorted(child.name for child in (path / "models").iterdir() if (child / MANIFEST).is_file())
        raise PredictError(
            f"{path} is a run directory; name one job's model directory: "
            + (", ".join(str(path / "models" / job) for job in jobs) or "(it holds none yet)")
        )
    detected = _detect_format(path)
    if wanted_format is not None and wanted_format != detected:
        raise PredictError(
            f"{path} is a {detected} model, not {wanted_format}; drop --format or name a {wanted_format} file"
        )
    manifest_directory = path.parent if path.parent.joinpath(MANIFEST).is_file() else None
    names = tuple(read_manifest(manifest_directory).get("features", ())) if manifest_directory else ()
    return ModelSource(path, detected, names)


def _from_job_directory(directory: Path, wanted_format: str | None) -> ModelSource:
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as error:
        raise PredictError(
            f"{directory / MANIFEST} cannot be read ({error}); export the model again"
        ) from None
    formats = manifest.get("formats", {})
    available = [
        name for name in FORMAT_PREFERENCE if name in formats and (directory / formats[name]).exists()
    ]
    names = tuple(manifest.get("features", ()))
    if wanted_format is not None:
        if wanted_format not in available:
            reason = manifest.get("not_written", {}).get(wanted_format)
            why = f" ({reason})" if reason else ""
            raise PredictError(
                f"{directory} has no {wanted_format} model{why}; available: {', '.join(available) or 'none'}"
            )
        return ModelSource(directory / formats[wanted_format], wanted_format, names)
    if not available:
        raise PredictError(f"{directory} lists no model file that exists; export the model again")
    return ModelSource(directory / formats[available[0]], available[0], names)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        raise PredictError(
            f"{path} holds neither a runjobs model ({MANIFEST}) nor a SavedModel (saved_model.pb); "
            "name a job's model directory, e.g. DIR/models/JOB"
        )
    suffix = path.suffix.lower()
    if suffix in FORMATS_BY_SUFFIX:
        return FORMATS_BY_SUFFIX[suffix]
    if suffix in TORCH_SUFFIXES:
        return _torch_file_format(path)
    raise PredictError(
        f"{path}: unknown model format; give a .keras, .onnx or .pt file, a SavedModel directory "
        "or a job's model directory"
    )


def _torch_file_format(path: Path) -> str:
    """TorchScript or state_dict, told apart by the archive's entries, without loading it.

    Both are zip archives; a TorchScript archive holds its compiled code under `code/`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise PredictError(
            f"{path} is not a torch archive (TorchScript or torch.save); give a file written by "
            "runjobs submit --save-models"
        ) from None
    holds_code = any("/code/" in f"/{entry}" for entry in entries)
    return "torchscript" if holds_code else "state_dict"


def load_model(source: ModelSource) -> LoadedModel:
    loader = {
        "torchscript": _load_torchscript,
        "state_dict": _load_state_dict,
        "saved_model": _load_saved_model,
        "keras": _load_keras,
        "onnx": _load_onnx,
    }[source.format]
    try:
        # TensorFlow logs a screenful at import and load (oneDNN, CUDA probing) before
        # its log level applies; keep the native stderr of loading off the terminal.
        with captured_output():
            feature_count, run = loader(source.path)
    except PredictError:
        raise
    except Exception as error:  # each framework fails in its own way; the user needs one line
        lines = [line for line in str(error).splitlines() if line.strip()]
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise PredictError(f"{source.path}: cannot load it as a {source.format} model ({detail})") from None
    return LoadedModel(source, feature_count, run)


def check_feature_count(model: LoadedModel, inputs: list[tuple[float, ...]]) -> None:
    count = model.feature_count
    given = len(inputs[0])
    if count is None or given == count:
        return
    names = f" ({', '.join(model.source.feature_names)})" if model.source.feature_names else ""
    example = ",".join(["1"] * count)
    raise PredictError(
        f"--input has {given} value(s) but the model takes {count} feature(s){names}; "
        f"give one value per feature, separated by commas, e.g. --input {example}"
    )


def _load_torchscript(path: Path):
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    feature_count = getattr(module, "in_features", None)

    def run(features: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(features)).numpy()

    return feature_count, run


def _load_state_dict(path: Path):
    import pickle

    import torch

    try:
        # weights_only: tensors and plain containers only; a pickled object is refused,
        # never constructed.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PredictError(
            f"{path}: refused: it holds Python objects, not only tensors, and runjobs reads a state_dict "
            "with torch.load(weights_only=True), which never runs them; give a state_dict.pt written by "
            "runjobs submit --save-models"
        ) from None
    weight = state.get("weight") if isinstance(state, dict) else None
    bias = state.get("bias") if isinstance(state, dict) else None
    if (
        not isinstance(weight, torch.Tensor)
        or not isinstance(bias, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[0] != 1
        or tuple(bias.shape) != (1,)
    ):
        raise PredictError(
            f"{path} is not the state_dict of an nn.Linear(K, 1) (keys weight [1, K] and bias [1]); "
            "give a state_dict.pt written by runjobs submit --save-models"
        )
    model = torch.nn.Linear(weight.shape[1], 1)
    model.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    model.eval()

    def run(features: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy()

    return int(weight.shape[1]), run


def _load_saved_model(path: Path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise PredictError(f"{path}: the SavedModel has no serving_default signature to call")
    _, input_specs = signature.structured_input_signature
    if len(input_specs) != 1:
        raise PredictError(
            f"{path}: the serving signature takes {len(input_specs)} inputs; runjobs models take 1"
        )
    ((input_name, input_spec),) = input_specs.items()
    feature_count = input_spec.shape[-1] if input_spec.shape.rank else None

    def run(features: np.ndarray):
        outputs = signature(**{input_name: tf.constant(features, dtype=input_spec.dtype)})
        return next(iter(outputs.values())).numpy()

    return feature_count, run


def _load_keras(path: Path):
    import keras

    # safe_mode refuses a .keras file whose config would deserialise Python code (lambdas).
    model = keras.saving.load_model(path, safe_mode=True)
    feature_count = model.input_shape[-1] if isinstance(model.input_shape, tuple) else None

    def run(features: np.ndarray):
        return keras.ops.convert_to_numpy(model(features))

    return feature_count, run


def _load_onnx(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise PredictError(f"reading {path} needs onnxruntime: {ONNX_INSTALL_HINT}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise PredictError(f"{path}: the ONNX model takes {len(inputs)} inputs; runjobs models take 1")
    dimension = inputs[0].shape[-1] if inputs[0].shape else None
    feature_count = dimension if isinstance(dimension, int) else None

    def run(features: np.ndarray):
        return session.run(None, {inputs[0].name: features})[0]

    return feature_count, run


def format_point(point: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in point)
