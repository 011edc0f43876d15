"""The framework registry: what it lists, that it stays light, and that a third framework is one entry.

The quick tests never import TensorFlow or torch: the registry answers every question
the control plane asks without them. A fake third framework (a closed-form least-squares
fit in numpy, with its own variant and model format) is registered by a test and then
trains through the task body, exports through workers/export.py, predicts through
`runjobs predict`'s loader and pairs in the report, with no other file edited.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.predict import predict
from jobs.record.records import empty_record
from jobs.report import combined, html
from workers import frameworks
from workers.distributed import SINGLE_WORKER, WorkerContext
from workers.export import FORMAT_PREFERENCE, MANIFEST, export_linear
from workers.frameworks.base import Framework, JobSettings, ModelLoadError, Predictor
from workers.models import dense_stack
from workers.training import Device, TrainerOutcome, TrainingData, TrainingJob


def test_the_registry_names_both_frameworks_with_their_variants_and_formats():
    assert frameworks.names() == ("tensorflow", "torch", "jax")
    assert frameworks.default_names() == ("tensorflow", "torch")
    assert frameworks.variants() == ("single", "mirrored", "multiworker", "ddp")
    assert frameworks.variants_of("tensorflow") == ("single", "mirrored", "multiworker")
    assert frameworks.variants_of("torch") == ("single", "ddp")
    assert frameworks.variants_of("jax") == ("single",)
    assert frameworks.variant_frameworks() == {
        "single": ("tensorflow", "torch", "jax"),
        "mirrored": ("tensorflow",),
        "multiworker": ("tensorflow",),
        "ddp": ("torch",),
    }
    # single and mirrored are one Ray task; multiworker and ddp one actor per worker.
    assert [frameworks.runs_one_task(name) for name in frameworks.variants()] == [True, True, False, False]

    assert frameworks.formats("tensorflow") == ("saved_model", "keras", "onnx")
    assert frameworks.formats("torch") == ("torchscript", "state_dict", "onnx")
    assert frameworks.formats("jax") == ("jax_export", "jax_params")
    assert {name: frameworks.format_file(name) for name in frameworks.format_preference()} == {
        "torchscript": "model.torchscript.pt",
        "saved_model": "saved_model",
        "jax_export": "model.jax_export",
        "keras": "model.keras",
        "state_dict": "state_dict.pt",
        "jax_params": "params.npz",
        "onnx": "model.onnx",
    }
    # `runjobs predict` tries a job directory's formats in this order: least needed first.
    assert FORMAT_PREFERENCE == (
        "torchscript", "saved_model", "jax_export", "keras", "state_dict", "jax_params", "onnx"
    )  # fmt: skip
    assert frameworks.format_owner("keras") == "tensorflow"
    assert frameworks.format_owner("state_dict") == "torch"
    assert frameworks.format_owner("onnx") is None, "onnxruntime reads ONNX; no framework is needed"

    assert frameworks.describe("torch").version_module == "torch"
    assert frameworks.display("tensorflow").colors["mirrored"] == "#bcbd22"
    assert frameworks.display("no-longer-registered") is None


def test_unknown_names_are_refused_with_the_valid_choices():
    with pytest.raises(
        frameworks.RegistryError, match="framework='mxnet': choose one of tensorflow, torch, jax"
    ):
        frameworks.get("mxnet")
    with pytest.raises(
        frameworks.RegistryError, match="variant='pmap': choose one of single, mirrored, multiworker, ddp"
    ):
        frameworks.frameworks_for_variant("pmap")
    with pytest.raises(frameworks.RegistryError, match="choose one of torchscript, saved_model"):
        frameworks.format_file("pickle")
    with pytest.raises(ValueError, match="framework='mxnet': choose one of tensorflow, torch, jax"):
        export_linear("mxnet", [1.0], 0.0, Path("unused"))


def test_every_registry_entry_names_a_module_that_exists():
    for name in frameworks.names():
        module_name, _, class_name = frameworks.describe(name).implementation.partition(":")
        assert importlib.util.find_spec(module_name) is not None, name
        assert class_name, name


LIGHT_PROGRAM = """
import sys
{imports}
frameworks.names(); frameworks.variants(); frameworks.variant_frameworks(); frameworks.format_preference()
frameworks.format_owner("keras"); frameworks.describe("torch"); frameworks.display("tensorflow")
loaded = {{name.split(".")[0] for name in sys.modules}}
print(",".join(sorted(loaded & {{"tensorflow", "torch", "jax", "ray", "keras", {extra}}})))
"""


@pytest.mark.parametrize(
    "imports, extra",
    [
        # The registry itself is plain Python: not even numpy.
        ("from workers import frameworks", '"numpy"'),
        # Its consumers on the control plane's side (the CLI, reports, predict before loading).
        (
            "from workers import frameworks\nimport workers.export, jobs.report.combined, jobs.report.html, "
            "jobs.predict, jobs.cli",
            '"onnxruntime"',
        ),
    ],
)
def test_importing_the_registry_and_asking_it_imports_no_framework(imports, extra):
    program = LIGHT_PROGRAM.format(imports=imports, extra=extra)
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "", f"imported {shown.stdout.strip()}"


# ---- each real implementation satisfies the interface --------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("tensorflow", marks=pytest.mark.slow),  # TensorFlow and Keras take seconds to import
        "torch",
        "jax",
    ],
)
def test_each_implementation_satisfies_the_interface(name, tmp_path):
    framework = frameworks.get(name)
    assert frameworks.get(name) is framework, "one instance per process"
    assert isinstance(framework, Framework)
    assert not inspect.isabstract(type(framework))
    assert set(framework.trained_variants) == set(frameworks.variants_of(name))
    assert framework.version == str(sys.modules[frameworks.describe(name).version_module].__version__)

    # Every format it exports lands at the registry's file name and loads back with the same numbers.
    linear = dense_stack("linear", 2, (), "linear")
    not_written = framework.export_model(linear, [np.array([[0.5], [-2.0]]), np.array([3.0])], tmp_path)
    for format_name in frameworks.formats(name):
        if format_name in not_written:
            continue
        path = tmp_path / frameworks.format_file(format_name)
        assert path.exists(), format_name
        predictor = frameworks.reader(format_name).load_model(path, format_name)
        assert predictor.feature_count == 2, format_name
        output = np.asarray(predictor.predict(np.array([[2.0, 1.0]], dtype=np.float32))).reshape(-1)
        assert output == pytest.approx([2.0]), format_name
    other = next(
        format_name for format_name in FORMAT_PREFERENCE if format_name not in frameworks.formats(name)
    )
    with pytest.raises(ModelLoadError, match=f"not {other}"):
        framework.load_model(tmp_path / "anything", other)

    # A variant of another framework is refused before any training.
    foreign = next(
        variant for variant in frameworks.variants() if variant not in frameworks.variants_of(name)
    )
    with pytest.raises(ValueError, match=f"variant='{foreign}' is not a {name} variant"):
        framework.train(training_job(name, variant=foreign), None, None, Device("cpu"))


# ---- a third framework: one module and one registry entry -----------------------------------

SHARDED = frameworks.Variant("sharded", one_task=True)  # the normal equations summed over row shards
NPZ = frameworks.ModelFormat("npz", "model.npz", preference=60, label="numpy .npz", suffixes=(".npz",))
LSTSQ = frameworks.FrameworkDescription(
    name="lstsq",
    implementation=f"{__name__}:LeastSquaresFramework",
    variants=(frameworks.SINGLE, SHARDED),
    formats=(NPZ,),
    version_module="numpy",
    display=frameworks.Display(label="least squares", abbreviation="lstsq", colors={"single": "#2ca02c"}),
)


class LeastSquaresFramework(Framework):
    """The exact least-squares fit in numpy: one "epoch" that lands on the optimum."""

    trained_variants = ("single", "sharded")

    def initialise(self, gpu_ids, allow_cpu_fallback, spec, context=SINGLE_WORKER) -> Device:
        return Device("cpu", gpu_ids, cpu_fallback=bool(gpu_ids))

    def train_variant(self, spec: JobSettings, plan, data: TrainingData, device, context) -> TrainerOutcome:
        started = time.perf_counter()
        design = np.hstack([data.features, np.ones((data.rows, 1), dtype=np.float32)]).astype(np.float64)
        shards = spec.workers if spec.variant == "sharded" else 1
        gram = sum(part.T @ part for part in np.array_split(design, shards))
        moment = sum(
            part.T @ target
            for part, target in zip(np.array_split(design, shards), np.array_split(data.target, shards))
        )
        solution = np.linalg.solve(gram, moment).reshape(-1)
        residual = design @ solution - data.target.reshape(-1)
        train_s = time.perf_counter() - started
        predictions = data.prediction_inputs.astype(np.float64) @ solution[:-1] + solution[-1]
        return TrainerOutcome(
            parameters=[solution[:-1].reshape(-1, 1), solution[-1:]],
            loss_history=[float(np.mean(residual**2))],
            epoch_seconds=[train_s],
            parameter_history=solution.reshape(1, -1),
            predictions=predictions,
            setup_s=0.0,
            train_s=train_s,
            predict_s=0.0,
        )

    def export_model(self, plan, parameters, directory) -> dict[str, str]:
        weights, bias = np.asarray(parameters[0]).reshape(-1), np.asarray(parameters[1]).reshape(-1)
        np.savez(self.format_path(directory, "npz"), weights=weights, bias=bias)
        return {}

    def model_loaders(self):
        return {"npz": load_npz}


def load_npz(path) -> Predictor:
    with np.load(path, allow_pickle=False) as saved:  # arrays only: no pickled objects
        weights, bias = saved["weights"], float(saved["bias"][0])
    return Predictor(len(weights), lambda features: features.astype(np.float64) @ weights + bias)


def training_job(framework: str, **fields) -> TrainingJob:
    """What a worker gets for a job of `framework` (JobSpec's validation knows only the registered list)."""
    return TrainingJob(framework, **{"epochs": 1, "predict": ((1800.0,),), **fields})


@pytest.fixture
def third_framework():
    frameworks.register(LSTSQ)
    try:
        yield frameworks.describe("lstsq")
    finally:
        frameworks.unregister("lstsq")


def test_a_registered_third_framework_shows_up_in_every_lookup(third_framework):
    assert frameworks.names() == ("tensorflow", "torch", "jax", "lstsq")
    assert frameworks.variants() == ("single", "mirrored", "multiworker", "ddp", "sharded")
    assert frameworks.frameworks_for_variant("single") == ("tensorflow", "torch", "jax", "lstsq")
    assert frameworks.variant_frameworks()["sharded"] == ("lstsq",)
    assert frameworks.runs_one_task("sharded")
    assert frameworks.format_preference()[-1] == "npz"
    assert frameworks.format_owner("npz") == "lstsq"

    framework = frameworks.get("lstsq")
    assert isinstance(framework, LeastSquaresFramework) and frameworks.get("lstsq") is framework
    with pytest.raises(
        ValueError, match="variant='ddp' is not a lstsq variant; choose one of single, sharded"
    ):
        framework.train(training_job("lstsq", variant="ddp"), None, None, Device("cpu"))


def test_a_third_framework_trains_exports_predicts_and_is_compared_with_no_other_edit(
    third_framework, tmp_path
):
    from workers.data import article_dataset
    from workers.entry import run_job

    dataset = article_dataset()
    single = run_job(training_job("lstsq", save_models=True), dataset, time.time())
    sharded = run_job(
        training_job("lstsq", variant="sharded", workers=2), dataset, time.time(), WorkerContext()
    )
    for result in (single, sharded):
        assert result["convergence"] == "converged"
        assert result["params"]["weights"] == pytest.approx(result["reference"]["weights"], abs=1e-9)
        assert result["predictions"][0]["output"] == pytest.approx(360.0, abs=1e-6)
        assert result["versions"]["lstsq"] == np.__version__

    # The worker's model files, written where the driver would, read back by `runjobs predict`.
    directory = tmp_path / "models" / "lstsq"
    for relative, content in single["model_files"].items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(content)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["framework"] == "lstsq" and manifest["formats"] == {"npz": "model.npz"}
    for model_path in (directory, directory / "model.npz"):
        outcome = predict(model_path, ["1800"])
        assert outcome["format"] == "npz"
        assert outcome["predictions"][0]["output"] == pytest.approx(360.0, abs=1e-6)

    # The report pairs it with the other frameworks, in registry order, and draws it in its colour.
    records = [
        empty_record(job_id, {"framework": name, "variant": "single", "workers": 1, "seed": 0}, "failed", "x")
        for job_id, name in (("lstsq", "lstsq"), ("tensorflow", "tensorflow"))
    ]
    (pair,) = combined.compare(records)["pairs"]
    assert pair["jobs"] == {"tensorflow": "tensorflow", "lstsq": "lstsq"}
    assert html._color(records[0]) == "#2ca02c"


def test_an_entry_that_disagrees_with_the_registry_is_refused():
    clashing_variant = frameworks.FrameworkDescription(
        name="clash",
        implementation="nowhere:Nothing",
        variants=(frameworks.Variant("single", one_task=False),),
        formats=(),
        version_module="json",
        display=frameworks.Display(label="clash", abbreviation="clash"),
    )
    with pytest.raises(frameworks.RegistryError, match="variant 'single' unlike the registered one"):
        frameworks.register(clashing_variant)
    stolen_format = frameworks.FrameworkDescription(
        name="clash",
        implementation="nowhere:Nothing",
        variants=(frameworks.SINGLE,),
        formats=(frameworks.model_format("keras"),),
        version_module="json",
        display=frameworks.Display(label="clash", abbreviation="clash"),
    )
    with pytest.raises(frameworks.RegistryError, match="format 'keras' is read by tensorflow already"):
        frameworks.register(stolen_format)
    with pytest.raises(frameworks.RegistryError, match="already registered"):
        frameworks.register(frameworks.describe("torch"))
    assert frameworks.names() == ("tensorflow", "torch", "jax")
