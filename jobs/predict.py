"""`runjobs predict`: load an exported model (any format `--save-models` writes) and predict.

MODEL is a job's model directory (`DIR/models/JOB`, with its `model.json`), from which
the first available format is taken (torchscript, saved_model, keras, state_dict, onnx)
unless one is asked for; or one model file or directory: a `.keras` file, a SavedModel
directory, a TorchScript or state_dict `.pt`, or a `.onnx` file.

Loading never unpickles untrusted data: TorchScript archives hold code and tensors,
a state_dict is read with `torch.load(weights_only=True)` (which refuses any object
that is not a tensor or a plain container), `.keras` files are loaded in Keras' safe
mode, and SavedModel and ONNX files are graphs. Only the framework the chosen format
needs is imported: the registry (workers/frameworks/) says which formats exist, how a
file of each is recognised, and which framework (or, for ONNX, onnxruntime alone) reads
it; the loaders are the frameworks' own.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers import frameworks
from workers.capture import captured_output
from workers.export import MANIFEST, read_manifest
from workers.frameworks.base import ModelLoadError


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
    preference = frameworks.format_preference()
    if wanted_format is not None and wanted_format not in preference:
        raise PredictError(f"--format {wanted_format}: choose one of {', '.join(preference)}")
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
    names = tuple(checked_manifest(manifest_directory).get("features", ())) if manifest_directory else ()
    return ModelSource(path, detected, names)


def checked_manifest(directory: Path) -> dict[str, Any]:
    """A job directory's model.json, refused (PredictError) unless it has the shape export writes.

    model.json may come from anywhere (a copied run, a hand edit), so every field is
    checked before use, and each format's file must lie inside the directory: a name
    such as `../x`, an absolute path or a symbolic link leading out would make predict
    load a file the model directory does not hold.
    """
    where = directory / MANIFEST
    again = "export the model again (runjobs submit --save-models)"
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError, RecursionError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise PredictError(f"{where} cannot be read as JSON ({detail}); {again}") from None
    if not isinstance(manifest, dict):
        raise PredictError(f"{where} holds a JSON {type(manifest).__name__}, not an object; {again}")
    formats = manifest.get("formats", {})
    if not isinstance(formats, dict) or not all(
        isinstance(name, str) and isinstance(file_name, str) and file_name
        for name, file_name in formats.items()
    ):
        raise PredictError(f"{where}: formats must map each format to its file name; {again}")
    features = manifest.get("features", [])
    if not isinstance(features, list) or not all(isinstance(name, str) for name in features):
        raise PredictError(f"{where}: features must be a list of names; {again}")
    not_written = manifest.get("not_written", {})
    if not isinstance(not_written, dict) or not all(
        isinstance(reason, str) for reason in not_written.values()
    ):
        raise PredictError(f"{where}: not_written must map each format to a reason; {again}")
    inside = directory.resolve()
    for name, file_name in formats.items():
        relative = Path(file_name)
        try:
            target = (directory / relative).resolve()
        except (OSError, RuntimeError):  # a loop of symbolic links (RuntimeError before Python 3.13)
            target = None
        if (
            relative.is_absolute()
            or ".." in relative.parts
            or target is None
            or not target.is_relative_to(inside)
        ):
            raise PredictError(
                f"{where}: the {name} file {file_name!r} is outside the model directory; "
                f"predict reads only files inside {directory}; {again}"
            )
    return manifest


def _from_job_directory(directory: Path, wanted_format: str | None) -> ModelSource:
    manifest = checked_manifest(directory)
    formats = manifest.get("formats", {})
    # The registry's order, asked now: a framework registered after import counts too.
    available = [
        name
        for name in frameworks.format_preference()
        if name in formats and (directory / formats[name]).exists()
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
    """The format of the model file or directory a user named, by the registry's formats, unloaded."""
    known = frameworks.model_formats()
    if path.is_dir():
        for candidate in known:
            if candidate.directory_marker and (path / candidate.directory_marker).is_file():
                return candidate.name
        directory_kinds = " nor ".join(
            f"a {candidate.label} ({candidate.directory_marker})"
            for candidate in known
            if candidate.directory_marker
        )
        raise PredictError(
            f"{path} holds neither a runjobs model ({MANIFEST}) nor {directory_kinds}; "
            "name a job's model directory, e.g. DIR/models/JOB"
        )
    suffix = path.suffix.lower()
    candidates = [candidate for candidate in known if suffix in candidate.suffixes]
    if len(candidates) == 1:
        return candidates[0].name
    if candidates:
        return _archive_format(path, candidates)
    suffixes = list(dict.fromkeys(ending for candidate in known for ending in candidate.suffixes[:1]))
    directories = [f"a {candidate.label} directory" for candidate in known if candidate.directory_marker]
    files = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else "".join(suffixes)
    choices = [f"a {files} file", *directories, "a job's model directory"]
    raise PredictError(f"{path}: unknown model format; give {', '.join(choices[:-1])} or {choices[-1]}")


def _archive_format(path: Path, candidates: list[frameworks.ModelFormat]) -> str:
    """Which of the formats sharing this file's suffix it is, from its zip entries, without loading it.

    TorchScript and a state_dict are both `.pt` zip archives: the format whose
    `archive_marker` folder the archive holds, else the one without a marker.
    """
    owners = {frameworks.format_owner(candidate.name) for candidate in candidates}
    owner = owners.pop() if len(owners) == 1 and None not in owners else "model"
    kinds = " or ".join(candidate.label for candidate in candidates)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [f"/{entry}" for entry in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        raise PredictError(
            f"{path} is not a {owner} archive ({kinds}); give a file written by runjobs submit --save-models"
        ) from None
    for candidate in candidates:
        if candidate.archive_marker and any(f"/{candidate.archive_marker}" in entry for entry in entries):
            return candidate.name
    unmarked = [candidate for candidate in candidates if not candidate.archive_marker]
    if not unmarked:
        raise PredictError(
            f"{path} is a zip archive but not a {kinds} one; give a file written by "
            "runjobs submit --save-models"
        )
    return unmarked[0].name


def load_model(source: ModelSource) -> LoadedModel:
    """Load `source` with what its format needs: its framework, or for ONNX onnxruntime alone."""
    try:
        # TensorFlow logs a screenful at import and load (oneDNN, CUDA probing) before
        # its log level applies; keep the native stderr of loading off the terminal.
        with captured_output():
            predictor = frameworks.reader(source.format).load_model(source.path, source.format)
    except ModelLoadError as error:
        raise PredictError(str(error)) from None
    except Exception as error:  # each framework fails in its own way; the user needs one line
        lines = [line for line in str(error).splitlines() if line.strip()]
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise PredictError(f"{source.path}: cannot load it as a {source.format} model ({detail})") from None
    return LoadedModel(source, predictor.feature_count, predictor.predict)


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


def format_point(point: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in point)
