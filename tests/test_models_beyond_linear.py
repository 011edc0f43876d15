"""Models beyond the line: the mlp, the shared start, runjobs' own update rules and parity verdicts.

Real frameworks throughout; the parity numbers below are the ones docs and README quote.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from jobs.plan.spec import SpecError, make_spec
from jobs.report import combined
from tests.helpers import run_cli
from workers import update_rules
from workers.data import load_dataset
from workers.models import dense_stack
from workers.models.shared_start import draw

SINE = "synthetic:rows=1000,features=1,noise=0.1,seed=0,function=sine"


def mlp_job(framework: str, dtype: str, epochs: int = 200, **fields):
    return make_spec(
        {
            "framework": framework,
            "model": "mlp",
            "hidden": (32, 32),
            "activation": "tanh",
            "dtype": dtype,
            "epochs": epochs,
            "data": SINE,
            **fields,
        }
    )


def trained(framework: str, dtype: str, **fields) -> dict:
    from workers.entry import run_job

    spec = mlp_job(framework, dtype, **fields)
    result = run_job(spec.for_worker(), load_dataset(SINE), time.time())
    return {"id": framework, "framework": framework, "variant": "single", "status": "succeeded",
            "error": None, "config": spec.to_record(), **result}  # fmt: skip


def relative_spread(first: list[float], second: list[float]) -> float:
    first_values, second_values = np.asarray(first), np.asarray(second)
    return float(np.max(np.abs(first_values - second_values) / np.abs(second_values)))


# ---- quick: the spec and the rules, no framework -------------------------------------------


def test_an_mlp_starts_shared_by_default_and_its_fields_are_refused_elsewhere():
    assert make_spec({"framework": "torch", "model": "mlp"}).init == "shared"
    assert make_spec({"framework": "torch", "model": "mlp", "init": "zeros"}).init == "zeros"
    assert make_spec({"framework": "torch"}).init == "zeros", "the linear model keeps its start"
    with pytest.raises(SpecError, match="hidden=8: applies to model=mlp, not model=linear"):
        make_spec({"framework": "torch", "hidden": (8,)})
    with pytest.raises(SpecError, match="model_args: arguments are for a user model's builder"):
        make_spec({"framework": "torch", "model": "mlp", "model_args": (("width", 3),)})
    with pytest.raises(SpecError, match="hidden=0: must be a whole number >= 1"):
        make_spec({"framework": "torch", "model": "mlp", "hidden": (0,)})


def test_the_shared_start_is_glorot_kernels_and_zero_biases_in_the_canonical_layout():
    plan = dense_stack("mlp", 3, (4,), "tanh")
    assert plan.layout == [
        ("dense_0/kernel", (3, 4)), ("dense_0/bias", (4,)),
        ("dense_1/kernel", (4, 1)), ("dense_1/bias", (1,)),
    ]  # fmt: skip
    first, second = draw([shape for _, shape in plan.layout], 7), draw([shape for _, shape in plan.layout], 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), "the same seed draws the same start"
    assert np.all(np.abs(first[0]) <= np.sqrt(6 / 7)) and first[0].std() > 0
    assert not first[1].any() and not first[3].any()


def test_an_invalid_mlp_is_refused_on_the_command_line_before_anything_starts(tmp_path):
    result = run_cli(["submit", "--model", "mlp", "--hidden", "64,x", "--dry-run"], tmp_path / "run")
    assert result.exit_code == 2
    assert "hidden" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---- slow: real frameworks ------------------------------------------------------------------


@pytest.mark.slow
def test_torch_runs_the_numpy_update_rule_exactly():
    import torch

    from workers.frameworks.torch import OwnUpdateRule

    spec = mlp_job("torch", "float64").for_worker()
    generator = np.random.default_rng(0)
    values = [generator.normal(size=(3, 2)), generator.normal(size=(2,))]
    moments = [(np.zeros_like(value), np.zeros_like(value)) for value in values]
    parameters = [torch.tensor(value, requires_grad=True) for value in values]
    rule = OwnUpdateRule(spec, parameters)
    for step_number in range(1, 4):
        gradients = [generator.normal(size=value.shape) for value in values]
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = torch.tensor(gradient)
        rule.step()
        values, moments = update_rules.step(
            values, gradients, moments, step_number, "adam", spec.lr, spec.beta_1, spec.beta_2, spec.epsilon
        )
        for parameter, expected in zip(parameters, values):
            np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=1e-14)


@pytest.mark.slow
def test_the_shared_start_gives_the_same_outputs_in_tensorflow_and_torch():
    import tensorflow as tf
    import torch

    from workers.frameworks import tensorflow as tensorflow_framework
    from workers.frameworks import torch as torch_framework

    spec = mlp_job("torch", "float32").for_worker()
    plan = dense_stack("mlp", 1, (32, 32), "tanh")
    inputs = np.linspace(-1, 1, 50, dtype=np.float32).reshape(-1, 1)
    torch_model = torch_framework.build_model(spec, plan)
    torch_framework.initialise_parameters(spec, plan, torch_model)
    keras_model = tensorflow_framework.build_model(spec, plan)
    tensorflow_framework.initialise_parameters(spec, plan, keras_model)
    with torch.no_grad():
        torch_outputs = torch_model(torch.from_numpy(inputs)).numpy()
    keras_outputs = keras_model(tf.constant(inputs)).numpy()
    np.testing.assert_allclose(keras_outputs, torch_outputs, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_tensorflow_and_torch_agree_at_every_epoch_in_float64_and_the_report_says_so():
    jobs = [trained("tensorflow", "float64"), trained("torch", "float64")]
    spread = relative_spread(jobs[0]["loss"]["history"], jobs[1]["loss"]["history"])
    print(f"float64: loss histories differ by at most {spread:.2e} relative")
    assert spread <= 1e-8
    for job in jobs:
        assert job["model"]["update_rule"] == "runjobs adam" and job["model"]["init"] == "shared"
        assert job["model"]["parameters"] == 1 * 32 + 32 + 32 * 32 + 32 + 32 + 1
        assert job["loss"]["floor"] == pytest.approx(0.01, rel=0.2)  # noise 0.1: about 0.1 squared
        assert job["loss"]["r2_gap"] is None and job["loss"]["floor_gap"] is not None
        assert [layer["name"] for layer in job["params"]["layers"]][0] == "dense_0/kernel"
        assert "values" not in job["params"]["layers"][0], "1,153 values: the summary only"

    (group,) = combined.framework_groups(jobs)
    assert group["parity"]["agree"] is True
    assert group["parity"]["loss_history_max_relative"] <= 1e-8
    sentences = "\n".join(combined._pair_sentences({"comparison": combined.compare(jobs), "jobs": jobs}))
    assert "frameworks agree within 1e-08 (float64, shared start)" in sentences


@pytest.mark.slow
def test_float32_drift_between_the_frameworks_stays_under_a_thousandth():
    tensorflow_job, torch_job = trained("tensorflow", "float32"), trained("torch", "float32")
    spread = relative_spread(tensorflow_job["loss"]["history"], torch_job["loss"]["history"])
    print(f"float32: loss histories differ by at most {spread:.2e} relative")
    assert spread <= 1e-3


@pytest.mark.slow
def test_every_variant_of_an_mlp_learns_what_its_single_device_twin_learns(ray_session, tmp_path):
    result = run_cli(
        ["submit", "--model", "mlp", "--hidden", "8,8", "--set", "activation=tanh", "--data", SINE,
         "--epochs", "50", "--workers", "2", "--variant", "single", "--variant", "mirrored",
         "--variant", "multiworker", "--variant", "ddp"],
        tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    jobs = {job["id"]: job for job in result.report()["jobs"]}
    twins = {
        "tensorflow-mirrored": "tensorflow",
        "tensorflow-multiworker": "tensorflow",
        "torch-ddp": "torch",
    }
    for variant_job, twin in twins.items():
        first, second = jobs[variant_job], jobs[twin]
        assert first["loss"]["final"] == pytest.approx(second["loss"]["final"], rel=1e-4), variant_job
        assert first["speed_vs_single"]["job"] == twin


@pytest.mark.slow
def test_an_mlp_comparison_through_submit_reports_parity_the_floor_and_the_fit(ray_session, tmp_path):
    output = tmp_path / "run"
    result = run_cli(
        ["submit", "--model", "mlp", "--hidden", "8", "--set", "activation=tanh", "--data", SINE,
         "--dtype", "float64", "--epochs", "100"],
        output,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = result.report()
    assert [job["framework"] for job in report["jobs"]] == ["tensorflow", "torch"]
    (group,) = report["comparison"]["groups"]
    assert group["parity"]["agree"] is True and group["parity"]["dtype"] == "float64"
    for job in report["jobs"]:
        assert job["loss"]["floor"] > 0 and job["loss"]["floor_gap"] is not None
        assert len(job["fitted"]["rows"]) == len(job["fitted"]["outputs"]) == 500
        assert job["params"]["count"] == 8 + 8 + 8 + 1 and "values" in job["params"]["layers"][0]
    markdown = (output / "report.md").read_text()
    assert "frameworks agree within 1e-08 (float64, shared start)" in markdown
    assert "| mlp | 25 params |" in markdown
    page = (output / "report.html").read_text()
    assert 'id="model-fit"' in page and "predictions against the target" in page
    assert ",model,parameter_count,floor_gap," in (output / "report.csv").read_text().splitlines()[0]


def fabricated(framework: str, shapes: list[list[int]], history: list[float]) -> dict:
    """A succeeded user-model record as entry.py writes one, reduced to what the comparison reads."""
    config = {"framework": framework, "model": "net.py", "init": "shared", "dtype": "float64", "seed": 0}
    return {
        "id": framework, "framework": framework, "variant": "single", "status": "succeeded", "error": None,
        "config": config, "convergence": "converged",
        "model": {"name": "net.py", "update_rule": "runjobs adam", "digest": "abc"},
        "params": {"layers": [{"name": f"p{i}", "shape": shape} for i, shape in enumerate(shapes)]},
        "reference": {"weights": [0.0], "bias": 0.0, "loss": 1.0},
        "loss": {"final": history[-1], "r2_gap": None, "history": history, "floor_gap": None},
        "predictions": [], "timings": {"startup_s": 1.0, "setup_s": 0.1, "train_s": 0.2},
        "placement": {"device": "cpu"},
    }  # fmt: skip


def test_a_user_model_built_with_different_layouts_is_not_compared_for_parity():
    jobs = [fabricated("tensorflow", [[1, 4], [4], [4, 1], [1]], [1.0, 0.5]),
            fabricated("torch", [[1, 8], [8], [8, 1], [1]], [1.0, 0.4])]  # fmt: skip
    (group,) = combined.framework_groups(jobs)
    assert group["parity"]["agree"] is None
    assert group["parity"]["layouts"] == {
        "tensorflow": [[1, 4], [4], [4, 1], [1]],
        "torch": [[1, 8], [8], [8, 1], [1]],
    }
    sentences = combined._pair_sentences({"comparison": combined.compare(jobs), "jobs": jobs})
    expected = "tensorflow vs torch: not comparable, the parameter layouts differ"
    assert f"{expected} (tensorflow 1x4 4 4x1 1; torch 1x8 8 8x1 1)" in sentences

    same = [
        fabricated("tensorflow", [[1, 4], [4]], [1.0, 0.5]),
        fabricated("torch", [[1, 4], [4]], [1.0, 0.5 + 1e-3]),
    ]
    (group,) = combined.framework_groups(same)
    assert group["parity"]["agree"] is False, "1e-3 apart in float64 is a disagreement"
