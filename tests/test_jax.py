"""JAX, runjobs' third framework: it starts where the others start, learns what they learn, and exports.

Jobs run in this process through the task body (workers.entry.run_job), without Ray,
except the one end-to-end `runjobs submit --framework jax`. Tests that import TensorFlow
or start Ray are slow; the JAX and torch ones are quick.
"""

from __future__ import annotations

import importlib
import json
import pickle
import time

import numpy as np
import pytest

from jobs.plan.spec import make_spec
from jobs.predict import predict
from tests.helpers import run_cli
from workers import frameworks, models
from workers.data import article_dataset, load_dataset
from workers.entry import run_job
from workers.export import MANIFEST, export_model
from workers.frameworks.base import ModelLoadError
from workers.models import dense_stack
from workers.training import Scaling, TrainingData, TrainingJob

SINE = "synthetic:rows=1000,features=1,noise=0.1,seed=0,function=sine"


def run(**fields):
    """One job's record, trained in this process as a Ray task would train it."""
    spec = make_spec(fields)
    dataset = article_dataset() if spec.data == "article" else load_dataset(spec.data)
    return run_job(spec.for_worker(), dataset, time.time())


def implementation(framework: str):
    """The module that implements `framework` (its build_model and initialise_parameters)."""
    return importlib.import_module(type(frameworks.get(framework)).__module__)


def outputs_at_the_start(framework: str, job: TrainingJob, features: np.ndarray) -> np.ndarray:
    """The model's outputs on `features` as `framework` builds and initialises it, before any step."""
    plan = models.plan(job, features.shape[1])
    module = implementation(framework)
    model = module.build_model(job, plan)
    if framework == "jax":
        parameters = module.initialise_parameters(job, plan, model)
        return np.asarray(model.apply(parameters, features)).reshape(-1)
    module.initialise_parameters(job, plan, model)
    if framework == "torch":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(features)).numpy().reshape(-1)
    return np.asarray(model(features)).reshape(-1)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("other", ["torch", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_a_shared_start_gives_the_same_model_in_jax_as_in_the_others(activation, other):
    # gelu is the exact (erf) one in every framework; JAX's default tanh approximation is 1e-3 off.
    job = TrainingJob(
        "jax", model="mlp", hidden=(16, 8), activation=activation, shared_start=True, initial_value=None
    )
    features = np.random.default_rng(1).uniform(-3, 3, size=(64, 3)).astype(np.float32)
    jax_outputs = outputs_at_the_start("jax", job, features)
    assert jax_outputs.dtype == np.float32
    others = outputs_at_the_start(other, job, features)
    # Relative to the outputs' scale: an output near 0 is a difference of terms near 1, each
    # rounded to float32 (and XLA's float32 tanh is a few units in the last place off libm's).
    largest = float(np.max(np.abs(others)))
    print(f"{other} {activation}: largest difference {np.max(np.abs(jax_outputs - others)) / largest:.2g}")
    np.testing.assert_allclose(jax_outputs, others, rtol=1e-6, atol=1e-6 * largest)


@pytest.mark.slow
def test_jax_torch_and_tensorflow_learn_the_same_mlp_epoch_by_epoch():
    fields = dict(model="mlp", hidden=(32, 32), activation="tanh", epochs=200, data=SINE)
    worst = {}
    for dtype in ("float64", "float32"):
        histories = {
            name: np.asarray(run(framework=name, dtype=dtype, **fields)["loss"]["history"])
            for name in ("jax", "torch", "tensorflow")
        }
        # 200 epochs are kept as 100, spread evenly (workers/entry.py, MAX_HISTORY_EPOCHS): the same ones.
        assert all(len(history) == 100 for history in histories.values())
        for other in ("torch", "tensorflow"):
            worst[dtype, other] = float(
                np.max(np.abs(histories["jax"] - histories[other]) / np.abs(histories[other]))
            )
    print("largest relative loss difference from jax at any epoch:", worst)
    assert worst["float64", "torch"] <= 1e-8 and worst["float64", "tensorflow"] <= 1e-8
    assert worst["float32", "torch"] <= 1e-3 and worst["float32", "tensorflow"] <= 1e-3


def test_the_article_job_converges_in_jax_as_in_torch():
    jax_record, torch_record = run(framework="jax"), run(framework="torch")
    assert jax_record["convergence"] == torch_record["convergence"] == "converged"
    assert jax_record["params"]["weights"] == pytest.approx(torch_record["params"]["weights"], rel=1e-4)
    assert jax_record["model"]["update_rule"] == "runjobs adam"
    assert jax_record["versions"]["jax"] == frameworks.get("jax").version
    assert len(jax_record["history"]["weights"]) == len(jax_record["history"]["epoch_s"]) == 100
    assert jax_record["history_epochs"][0] == 1 and jax_record["history_epochs"][-1] == 500
    assert jax_record["timings"]["setup_s"] > 0 and jax_record["timings"]["train_s"] > 0


@pytest.mark.parametrize(
    "fields, update_rule",
    [
        ({"batch_size": 3}, "runjobs adam"),  # 3 batches of 3 and one of 1 each epoch
        ({"loop": "article"}, "jax adam (stock)"),  # optax's Adam
        ({"loop": "article", "optimizer": "sgd", "lr": 1e-7}, "jax sgd (stock)"),
        ({"init": "framework", "dtype": "float64"}, "runjobs adam"),
    ],
)
def test_minibatches_optax_and_jaxs_own_initialiser_also_converge(fields, update_rule):
    record = run(framework="jax", **fields)
    assert record["convergence"] == "converged", record["loss"]
    assert record["model"]["update_rule"] == update_rule


def test_a_warm_worker_reuses_its_compiled_loop_with_the_next_jobs_settings():
    framework = frameworks.get("jax")
    dataset = article_dataset()
    data = TrainingData.prepare(dataset, Scaling.standardise(dataset), np.array([[0.5]]), "float32")

    def train(framework, **fields):
        job = make_spec({"framework": "jax", "model": "mlp", "hidden": (8,), **fields}).for_worker()
        device = framework.initialise((), False, job)
        return framework.train(job, models.plan(job, 1), data, device)

    train(framework, epochs=30, lr=0.01, seed=0, batch_size=4)
    compiled = framework.compilations
    # Other settings, and fewer epochs: the loop records up to 32 epochs (the next power of two).
    warm = train(framework, epochs=25, lr=0.05, seed=1, batch_size=4, optimizer="sgd")
    assert framework.compilations == compiled + 1, "sgd's state differs from adam's: a loop of its own"
    warm = train(framework, epochs=20, lr=0.1, seed=2, batch_size=4)
    assert framework.compilations == compiled + 1, "a job of a known shape compiles nothing new"
    cold_framework = type(framework)(frameworks.describe("jax"))
    cold = train(cold_framework, epochs=20, lr=0.1, seed=2, batch_size=4)
    assert cold_framework.compilations == 1
    assert len(warm.loss_history) == 20
    np.testing.assert_array_equal(warm.loss_history, cold.loss_history)
    np.testing.assert_array_equal(warm.predictions, cold.predictions)


USER_MODEL = """
import numpy as np

def build_jax(features, config):
    def apply(parameters, x):
        return x @ parameters["dense"]["kernel"] + parameters["dense"]["bias"]
    return apply, {"dense": {"kernel": np.zeros((features, 1)), "bias": np.zeros(1)}}
"""
LIST_MODEL = """
import numpy as np

def build_jax(features, config):
    return (lambda parameters, x: x @ parameters[0] + parameters[1]), [np.zeros((features, 1)), np.zeros(1)]
"""


def test_a_user_model_trains_from_the_shared_start_and_names_its_parameters(tmp_path):
    path = tmp_path / "affine.py"
    path.write_text(USER_MODEL)
    record = run(framework="jax", model=str(path), normalize=True)
    assert record["model"]["init"] == "shared" and record["model"]["parameters"] == 2
    assert [layer["name"] for layer in record["params"]["layers"]] == ["dense/bias", "dense/kernel"]
    assert record["loss"]["final"] < 0.01 * float(np.var(article_dataset().target))

    # A list's parameters are named by their place in it.
    path.write_text(LIST_MODEL)
    job = make_spec({"framework": "jax", "model": str(path)}).for_worker()
    built = implementation("jax").build_model(job, models.plan(job, 1))
    assert built.layout == [("param_0", (1, 1)), ("param_1", (1,))]

    path.write_text("def build_jax(features, config):\n    return 'not a model'\n")
    with pytest.raises(TypeError, match=f"{path.name}:1: build_jax returned builtins.str, not a pair"):
        run(framework="jax", model=str(path))


# ---- export and predict ------------------------------------------------------------------------


def reference_outputs(plan, parameters, features):
    """The dense stack in numpy float64: what every exported format must compute."""
    from math import erf, sqrt

    exact_gelu = np.vectorize(lambda value: 0.5 * value * (1 + erf(value / sqrt(2))))
    activations = {"linear": lambda x: x, "relu": lambda x: np.maximum(x, 0), "tanh": np.tanh}
    activations["gelu"] = exact_gelu
    outputs = features.astype(np.float64)
    for index, layer in enumerate(plan.layers):
        outputs = activations[layer.activation](outputs @ parameters[2 * index] + parameters[2 * index + 1])
    return outputs.reshape(-1)


@pytest.mark.parametrize(
    "plan",
    [dense_stack("linear", 2, (), "linear"), dense_stack("mlp", 2, (5, 3), "gelu")],
    ids=["linear", "mlp"],
)
def test_every_jax_format_round_trips_through_the_registrys_reader(plan, tmp_path):
    rng = np.random.default_rng(2)
    parameters = [rng.normal(size=shape) for _, shape in plan.layout]
    assert export_model("jax", plan, parameters, tmp_path) == ["jax_export", "jax_params"]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["formats"] == {"jax_export": "model.jax_export", "jax_params": "params.npz"}

    features = rng.uniform(-2, 2, size=(7, 2)).astype(np.float32)
    for format_name in ("jax_export", "jax_params"):
        path = tmp_path / frameworks.format_file(format_name)
        predictor = frameworks.reader(format_name).load_model(path, format_name)
        assert predictor.feature_count == 2
        outputs = np.asarray(predictor.predict(features))
        assert outputs.shape == (7, 1), format_name
        np.testing.assert_allclose(
            outputs.reshape(-1), reference_outputs(plan, parameters, features), rtol=1e-5, atol=1e-5
        )

    # `runjobs predict` on the job directory takes the compiled program first; on a file, its format.
    expected = reference_outputs(plan, parameters, np.array([[0.5, -1.0]]))[0]
    for model_path, format_name in (
        (tmp_path, "jax_export"),
        (tmp_path / "params.npz", "jax_params"),
        (tmp_path / "model.jax_export", "jax_export"),
    ):
        answer = predict(model_path, ["0.5,-1"])
        assert answer["format"] == format_name
        assert answer["predictions"][0]["output"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


class Payload:
    def __reduce__(self):  # what an unpickler would run
        return (print, ("pickled code ran",))


def test_files_runjobs_did_not_write_are_refused_and_never_run(tmp_path, capsys):
    framework = frameworks.get("jax")
    pickled = tmp_path / "params.npz"
    np.save(pickled, np.array([Payload()], dtype=object), allow_pickle=True)
    pickled.write_bytes((tmp_path / "params.npz.npy").read_bytes())
    with pytest.raises(ModelLoadError, match="allow_pickle=False"):
        framework.load_model(pickled, "jax_params")
    assert "pickled code ran" not in capsys.readouterr().out

    garbage = tmp_path / "model.jax_export"
    garbage.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="not a jax.export file"):
        framework.load_model(garbage, "jax_export")

    # The arrays of two layers and nothing that says their activations.
    np.savez(tmp_path / "bare.npz", p0=np.ones((2, 3)), p1=np.ones(3), p2=np.ones((3, 1)), p3=np.ones(1))
    with pytest.raises(ModelLoadError, match="names their activations"):
        framework.load_model(tmp_path / "bare.npz", "jax_params")


# ---- through Ray and the CLI --------------------------------------------------------------------


@pytest.mark.slow
# Ray starts its processes with fork and exec; JAX, already imported here, warns about any fork.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_runjobs_submit_framework_jax_trains_on_ray_and_reports_it(ray_session, tmp_path):
    result = run_cli(["submit", "--framework", "jax", "--save-models"], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    (job,) = result.report()["jobs"]
    assert (job["framework"], job["status"], job["convergence"]) == ("jax", "succeeded", "converged")
    assert job["predictions"][0]["output"] == pytest.approx(360.0, rel=0.005)
    assert "jax" in job["versions"] and job["placement"]["device"] == "cpu"
    assert any(line.startswith("jax") and "converged" in line for line in result.stdout.splitlines())
    shown = run_cli(["predict", str(tmp_path / "run" / "models" / "jax"), "--input", "1800", "--json"])
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["output"] == pytest.approx(job["predictions"][0]["output"], rel=1e-6)


def test_a_submit_that_names_no_framework_still_compares_tensorflow_and_torch_only():
    planned = run_cli(["submit", "--dry-run"])
    assert planned.exit_code == 0, planned.stderr
    assert planned_frameworks(planned.stdout) == ["tensorflow", "torch"]
    assert frameworks.default_names() == ("tensorflow", "torch")
    named = run_cli(["submit", "--dry-run", "--framework", "jax", "--framework", "torch"])
    assert planned_frameworks(named.stdout) == ["jax", "torch"]


def planned_frameworks(table: str) -> list[str]:
    """The framework column of --dry-run's table: the lines between its header and what packing says."""
    lines = table.splitlines()
    return [
        line.split()[0]
        for line in lines[1 : next(i for i, line in enumerate(lines) if line.startswith("packing"))]
    ]
