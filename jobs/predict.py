"""`runjobs predict`: load an exported model (any format `--save-models` writes) and predict.

MODEL is a job's model directory (`DIR/models/JOB`, with its `model.json`), from which
the first format that loads is taken (in the registry's order: torchscript, saved_model,
jax_export, keras, state_dict, jax_params, onnx) unless one is asked for; or one model
file or directory: a `.keras` file, a SavedModel directory, a TorchScript or state_dict
`.pt`, a `.jax_export`, a `params.npz` or a `.onnx` file.

Loading never unpickles untrusted data and never runs a user model's code unless the
user passes --trust-code (then only the code whose digest the model was saved with):
TorchScript archives hold code and tensors, a state_dict is read with `torch.load(weights_only=True)`
(which refuses any object that is not a tensor or a plain container) into the stack
model.json describes, a `.keras` file is read in Keras' safe mode once its config is
checked to be a stack of Dense layers, a SavedModel's variables are read without running
its graph, and ONNX files are graphs of standard operators. A user model's state_dict
and SavedModel cannot be read that way: in a job's model directory the first format
that can is taken, and naming one of them says which to use instead. Only the framework
the chosen format needs is imported: the registry (workers/frameworks/) says which
formats exist, how a file of each is recognised, and which framework (or, for ONNX,
onnxruntime alone) reads it; the loaders are the frameworks' own.
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
from workers.export import MANIFEST, UNITS, manifest_layers, read_manifest, user_model_file
from workers.frameworks.base import ModelLoadError


class PredictError(ValueError):
    """The model or the inputs cannot be used; the message says what to give instead."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    format: str
    feature_names: tuple[str, ...] = ()  # from the job's manifest, when there is one
    feature_count: int | None = None  # from the job's manifest, for a format that does not say


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    feature_count: int | None  # None when the format does not say
    run: Callable[[np.ndarray], Any]  # float32 [rows, K] -> [rows, 1]


def predict(
    model_path: Path,
    input_texts: list[str],
    wanted_format: str | None = None,
    trust_code: bool = False,
    model_code: Path | None = None,
) -> dict[str, Any]:
    """Load the model at `model_path` and predict every input; returns the source and predictions.

    `trust_code`: a user model's formats that need its code load by running it (the file
    the manifest names, or `model_code`), once its digest matches the saved model's.
    """
    inputs = parse_inputs(input_texts)
    model = load_first(resolve_models(model_path, wanted_format), Trust(trust_code, model_code))
    source = model.source
    check_feature_count(model, inputs)
    try:
        outputs = np.asarray(model.run(np.asarray(inputs, dtype=np.float32)), dtype=np.float64).reshape(-1)
    except Exception as error:  # each framework fails in its own way; the user needs one line
        raise PredictError(
            f"{source.path}: the {source.format} model failed on the inputs ({_detail(error)})"
        ) from None
    if len(outputs) != len(inputs):
        raise PredictError(
            f"{source.path}: the {source.format} model gave {len(outputs)} values for "
            f"{len(inputs)} input(s); runjobs models give one value per input"
        )
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
    """Which file to load, and as what, without importing any framework: the first of resolve_models."""
    return resolve_models(path, wanted_format)[0]


def resolve_models(path: Path, wanted_format: str | None = None) -> list[ModelSource]:
    """The files to try, in order, and as what, without importing any framework.

    One, unless `path` is a job's model directory and no format is asked for: then each
    format it holds, in the registry's order of preference.
    """
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
    if not path.parent.joinpath(MANIFEST).is_file():
        return [ModelSource(path, detected)]
    manifest = checked_manifest(path.parent)
    return [ModelSource(path, detected, tuple(manifest.get("features", ())), manifest.get("feature_count"))]


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
    feature_count = manifest.get("feature_count")
    if feature_count is not None and (
        not isinstance(feature_count, int) or isinstance(feature_count, bool) or feature_count < 1
    ):
        raise PredictError(f"{where}: feature_count must be a whole number above 0; {again}")
    try:
        manifest_layers(manifest, where)
    except ModelLoadError as error:
        raise PredictError(f"{error}; {again}") from None
    user_model = manifest.get("user_model")
    if user_model is not None and not (
        isinstance(user_model, dict) and all(isinstance(value, str) for value in _strings(user_model))
    ):
        raise PredictError(f"{where}: user_model must be an object of name, filename and digest; {again}")
    units = manifest.get("units", "original")
    if units not in UNITS:
        raise PredictError(f"{where}: units must be one of {', '.join(UNITS)}; {again}")
    if units == "standardised":
        # The files compute in the units the model was trained in, and the manifest does
        # not hold the data's means and scales to undo them.
        raise PredictError(
            f"{where}: user model {user_model_file(user_model or {})} was trained on standardised data "
            "(--normalize), so its files take and give standardised values, which runjobs predict cannot "
            "map back to the data's units; train it without --normalize to predict with it"
        )
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


def _strings(user_model: dict[str, Any]) -> list[Any]:
    """The fields of a manifest's user_model that must be text, those it has."""
    return [user_model[key] for key in ("name", "filename", "digest") if key in user_model]


def _from_job_directory(directory: Path, wanted_format: str | None) -> list[ModelSource]:
    manifest = checked_manifest(directory)
    formats = manifest.get("formats", {})
    # The registry's order, asked now: a framework registered after import counts too.
    available = [
        name
        for name in frameworks.format_preference()
        if name in formats and (directory / formats[name]).exists()
    ]
    names = tuple(manifest.get("features", ()))
    count = manifest.get("feature_count")
    if wanted_format is not None:
        if wanted_format not in available:
            reason = manifest.get("not_written", {}).get(wanted_format)
            why = f" ({reason})" if reason else ""
            raise PredictError(
                f"{directory} has no {wanted_format} model{why}; available: {', '.join(available) or 'none'}"
            )
        return [ModelSource(directory / formats[wanted_format], wanted_format, names, count)]
    if not available:
        raise PredictError(f"{directory} lists no model file that exists; export the model again")
    return [ModelSource(directory / formats[name], name, names, count) for name in available]


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


@dataclass(frozen=True)
class Trust:
    """Whether the user trusts a user model's code (--trust-code), and where that code is."""

    code: bool = False
    model_code: Path | None = None


def load_first(sources: list[ModelSource], trust: Trust = Trust()) -> LoadedModel:
    """The first of `sources` that loads; one runjobs refuses (a user model's state_dict) passes to the next.

    When every one is refused, the refusals, each naming its file, are the error.
    """
    refusals = []
    for source in sources:
        try:
            if trust.code:
                trusted = load_with_code(source, trust)
                if trusted is not None:
                    return trusted
            return load_model(source)
        except _Refused as refusal:
            refusals.append(str(refusal))
    raise PredictError("; ".join(refusals))


class _Refused(PredictError):
    """A loader refused the file (ModelLoadError): another format of the same model may still load."""


def load_model(source: ModelSource) -> LoadedModel:
    """Load `source` with what its format needs: its framework, or for ONNX onnxruntime alone."""
    try:
        # TensorFlow logs a screenful at import and load (oneDNN, CUDA probing) before
        # its log level applies; keep the native stderr of loading off the terminal.
        with captured_output():
            predictor = frameworks.reader(source.format).load_model(source.path, source.format)
    except ModelLoadError as error:
        raise _Refused(str(error)) from None
    except Exception as error:  # each framework fails in its own way; the user needs one line
        raise PredictError(
            f"{source.path}: cannot load it as a {source.format} model ({_detail(error)})"
        ) from None
    feature_count = predictor.feature_count if predictor.feature_count is not None else source.feature_count
    return LoadedModel(source, feature_count, predictor.predict)


def load_with_code(source: ModelSource, trust: Trust) -> LoadedModel | None:
    """A user model's file that needs its code, loaded by running it; None for any other file."""
    from workers.export import NEEDS_USER_CODE, manifest_beside
    from workers.models import ModelPlan
    from workers.models.user import UserModelError, digest_of, read_source

    if source.format not in NEEDS_USER_CODE:
        return None
    try:
        manifest = manifest_beside(source.path) or {}
    except ModelLoadError as error:
        raise PredictError(str(error)) from None
    user_model = manifest.get("user_model")
    if not isinstance(user_model, dict):
        return None
    code = trust.model_code or user_model.get("filename") or user_model.get("name")
    try:
        code_source = read_source(str(code))
    except (UserModelError, ValueError, OSError) as error:
        raise PredictError(
            f"{source.path}: --trust-code needs the model's code, and {error}; pass --model-code PATH.py"
        ) from None
    if digest_of(code_source.text) != user_model.get("digest"):
        raise PredictError(
            f"{code_source.filename} is not the code {source.path} was trained with (its digest differs "
            "from model.json's); pass the version it was trained with as --model-code PATH.py"
        )
    arguments = user_model.get("model_args") if isinstance(user_model.get("model_args"), dict) else {}
    plan = ModelPlan(
        user_model.get("name") or str(code),
        int(manifest["feature_count"]),
        user=code_source,
        arguments=tuple(sorted(arguments.items())),
    )
    try:
        with captured_output():
            predictor = frameworks.get(manifest["framework"]).load_with_code(source.path, source.format, plan)
    except ModelLoadError as error:
        raise _Refused(str(error)) from None
    except Exception as error:  # the user's code may fail in its own way: one line, with its type
        raise PredictError(
            f"{source.path}: loading it with {code_source.filename} failed ({_detail(error)})"
        ) from None
    return LoadedModel(source, plan.feature_count, predictor.predict)


def _detail(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
