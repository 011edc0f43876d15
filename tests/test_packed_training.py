"""Packed training, the worker's side: a pack's jobs learn what each learns alone.

Each framework's `train_pack` runs in this process, without Ray, against its own
`train_variant` on every job of the pack one at a time: parameters, loss history,
parameter history, predictions and fitted outputs agree to 1e-5 relative in float32 and
1e-10 in float64, for the linear model and an mlp, in full batches and minibatches
(each job shuffling in its own order), with every way parameters start. A job that
diverges leaves its pack-mates exactly as they would be without it. TensorFlow's cases
are slow (its import and tracing); torch's and JAX's are quick.
"""

from __future__ import annotations

import numpy as np
import pytest

from jobs.plan.spec import make_spec
from workers import frameworks, models
from workers.data import load_dataset
from workers.frameworks.base import PackingUnsupported
from workers.training import Scaling, TrainingData

DATA = "synthetic:rows=96,features=2,noise=0.1,seed=3,function=linear"
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}

FRAMEWORKS = [
    pytest.param(name, id=name, marks=[pytest.mark.slow] if name == "tensorflow" else [])
    for name in ("tensorflow", "torch", "jax")
]


def specs_for(framework: str, configs: list[dict], **shared) -> list:
    return [
        make_spec({"framework": framework, "predict": ((0.5, -1.0),), **shared, **config}).for_worker()
        for config in configs
    ]


def trained_alone_and_packed(framework_name: str, specs: list):
    framework = frameworks.get(framework_name)
    device = framework.initialise((), False, specs[0])
    dataset = load_dataset(DATA)
    scaling = Scaling.identity(dataset.feature_count)
    prediction_inputs = np.asarray(specs[0].predict, dtype=np.float64)
    data = TrainingData.prepare(dataset, scaling, prediction_inputs, specs[0].dtype)
    plan = models.plan(specs[0], dataset.feature_count)
    alone = [framework.train(spec, plan, data, device) for spec in specs]
    packed = framework.train_pack(specs, plan, data, device)
    return alone, packed


def assert_same(alone, packed, tolerance: float) -> None:
    assert len(packed) == len(alone)
    for one, other in zip(alone, packed):
        np.testing.assert_allclose(other.loss_history, one.loss_history, rtol=tolerance, atol=tolerance)
        for mine, theirs in zip(other.parameters, one.parameters):
            np.testing.assert_allclose(mine, theirs, rtol=tolerance, atol=tolerance)
        if one.parameter_history is not None:
            np.testing.assert_allclose(
                other.parameter_history, one.parameter_history, rtol=tolerance, atol=tolerance
            )
        np.testing.assert_allclose(other.predictions, one.predictions, rtol=tolerance, atol=tolerance)
        if one.fitted is not None:
            np.testing.assert_allclose(other.fitted, one.fitted, rtol=tolerance, atol=tolerance)
        assert other.update_rule == one.update_rule
        assert len(other.epoch_seconds) == len(one.epoch_seconds)


SWEEP = [
    {"lr": 0.05, "seed": 0},
    {"lr": 0.01, "seed": 1, "beta_1": 0.8},
    {"lr": 0.002, "seed": 2, "beta_2": 0.99, "epsilon": 1e-5},
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size", [None, 24])
def test_linear_pack_matches_each_job_alone(framework, dtype, batch_size):
    specs = specs_for(framework, SWEEP, epochs=60, dtype=dtype, batch_size=batch_size)
    alone, packed = trained_alone_and_packed(framework, specs)
    assert_same(alone, packed, TOLERANCE[dtype])
    # Different learning rates learn different lines: the pack did not train one job thrice.
    assert len({round(outcome.loss_history[-1], 9) for outcome in packed}) == len(SWEEP)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size", [None, 32])
def test_mlp_pack_matches_each_job_alone(framework, dtype, batch_size):
    specs = specs_for(
        framework,
        SWEEP,
        model="mlp",
        hidden=(8, 4),
        activation="tanh",
        init="shared",
        epochs=40,
        dtype=dtype,
        batch_size=batch_size,
    )
    alone, packed = trained_alone_and_packed(framework, specs)
    assert_same(alone, packed, TOLERANCE[dtype])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_start_and_sgd_pack(framework):
    """The framework's own initialiser (per seed), one value per job, and plain SGD."""
    own = specs_for(framework, SWEEP, model="mlp", hidden=(6,), init="framework", epochs=30)
    alone, packed = trained_alone_and_packed(framework, own)
    assert_same(alone, packed, TOLERANCE["float32"])
    values = specs_for(
        framework,
        [{"lr": 0.01, "init": "0"}, {"lr": 0.02, "init": "0.5"}],
        optimizer="sgd",
        epochs=30,
    )
    alone, packed = trained_alone_and_packed(framework, values)
    assert_same(alone, packed, TOLERANCE["float32"])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_diverging_job_leaves_its_pack_mates_alone(framework):
    calm = [{"lr": 0.01, "seed": 0}, {"lr": 0.02, "seed": 1}]
    wild = {"lr": 1e30, "seed": 2, "optimizer": "sgd"}
    shared = {"epochs": 40, "optimizer": "sgd", "batch_size": 16}
    alone, _ = trained_alone_and_packed(framework, specs_for(framework, calm, **shared))
    _, packed = trained_alone_and_packed(framework, specs_for(framework, [calm[0], wild, calm[1]], **shared))
    assert not np.isfinite(packed[1].loss_history[-1])
    assert_same(alone, [packed[0], packed[2]], TOLERANCE["float32"])


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"
JAX_MODEL = """
import numpy as np
import jax.numpy as jnp

def build_jax(features, config):
    def apply(parameters, x):
        return jnp.tanh(x @ parameters["hidden"] + parameters["shift"]) @ parameters["out"]
    return apply, {"hidden": np.zeros((features, 6)), "shift": np.zeros(6), "out": np.zeros((6, 1))}
"""
# Dropout draws random numbers inside the forward pass, which torch.func's vmap refuses by
# default: the pack's jobs then train one after another (workers/packed.py).
DROPOUT_MODEL = """
def build_torch(features, config):
    import torch
    return torch.nn.Sequential(torch.nn.Linear(features, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 1))
"""


def test_user_models_pack_in_torch_and_jax(tmp_path):
    torch_specs = specs_for("torch", SWEEP, model=str(EXAMPLES / "user_model.py"), epochs=30, batch_size=32)
    alone, packed = trained_alone_and_packed("torch", torch_specs)
    assert_same(alone, packed, TOLERANCE["float32"])
    path = tmp_path / "tanh_net.py"
    path.write_text(JAX_MODEL)
    jax_specs = specs_for("jax", SWEEP, model=str(path), epochs=30, dtype="float64")
    alone, packed = trained_alone_and_packed("jax", jax_specs)
    assert_same(alone, packed, TOLERANCE["float64"])


def test_a_user_model_that_cannot_vectorise_trains_its_pack_one_job_after_another(tmp_path):
    import time

    from workers.packed import TrainingPack, run_pack

    path = tmp_path / "dropout.py"
    path.write_text(DROPOUT_MODEL)
    specs = specs_for("torch", SWEEP, model=str(path), epochs=5)
    with pytest.raises(PackingUnsupported, match="torch.func cannot vectorise"):
        trained_alone_and_packed("torch", specs)
    result = run_pack(TrainingPack("pack-torch-test", tuple(specs)), load_dataset(DATA), time.time())
    assert result["pack"]["vectorised"] is False and "torch.func cannot vectorise" in result["pack"]["why"]
    assert [member["status"] for member in result["members"]] == ["succeeded"] * len(SWEEP)
    assert all(member["result"]["timings"]["pack"]["vectorised"] is False for member in result["members"])


SEEDED_MODEL = """
def build_torch(features, config):
    import torch
    width = 3 + config["seed"] % 2
    return torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.Linear(width, 1))
"""


def test_a_user_model_built_otherwise_for_another_seed_is_not_vectorised(tmp_path):
    path = tmp_path / "seeded.py"
    path.write_text(SEEDED_MODEL)
    specs = specs_for("torch", SWEEP, model=str(path), epochs=5)
    with pytest.raises(PackingUnsupported, match="builds another model for seed 1"):
        trained_alone_and_packed("torch", specs)
