"""The job spec: layering of defaults, presets and overrides, and its validation."""

from __future__ import annotations

import pytest

from jobs.plan.spec import FIELD_NAMES, JobSpec, Overrides, SpecError, build_job_specs, job_ids


def test_default_specs_are_the_built_in_comparison():
    tensorflow, torch = build_job_specs((), Overrides())
    assert (tensorflow.framework, torch.framework) == ("tensorflow", "torch")
    for spec in (tensorflow, torch):
        assert (spec.epochs, spec.optimizer, spec.lr, spec.init, spec.batch_size) == (
            500,
            "adam",
            0.01,
            "zeros",
            None,
        )
    assert {**tensorflow.to_record(), "framework": "-"} == {**torch.to_record(), "framework": "-"}


def test_article_preset_uses_each_frameworks_own_defaults():
    tensorflow, torch = build_job_specs((), Overrides(), preset="article")
    assert (tensorflow.lr, tensorflow.epsilon, tensorflow.batch_size, tensorflow.init, tensorflow.loop) == (
        0.001, 1e-7, 32, "framework", "article",
    )  # fmt: skip
    assert (torch.lr, torch.epsilon, torch.batch_size, torch.init) == (0.01, 1e-8, None, "framework")


def test_set_applies_to_every_framework_or_to_one():
    overrides = Overrides()
    overrides.add_assignment("epochs=20")
    overrides.add_assignment("torch.lr=0.5")
    overrides.add_assignment("batch-size=4")
    tensorflow, torch = build_job_specs((), overrides)
    assert (tensorflow.epochs, tensorflow.lr, tensorflow.batch_size) == (20, 0.01, 4)
    assert (torch.epochs, torch.lr, torch.batch_size) == (20, 0.5, 4)


def test_set_parses_every_field_type():
    overrides = Overrides()
    for assignment in [
        "normalize=true",
        "predict=1800;2000",
        "features=a,b",
        "gpus_per_job=0.5",
        "init=0.25",
    ]:
        overrides.add_assignment(assignment)
    assert overrides.common == {
        "normalize": True, "predict": ((1800.0,), (2000.0,)), "features": ("a", "b"),
        "gpus_per_job": 0.5, "init": "0.25",
    }  # fmt: skip


def test_unknown_field_lists_the_valid_ones():
    with pytest.raises(SpecError) as error:
        Overrides().add_assignment("learning_rate=0.1")
    assert "unknown job field 'learning_rate'" in str(error.value)
    assert ", ".join(FIELD_NAMES) in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"framework": "mxnet"}, "framework='mxnet': choose one of tensorflow, torch, jax"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop': choose one of adam, sgd"),
        ({"epochs": 0}, "epochs=0: must be a whole number >= 1"),
        ({"lr": 0.0}, "lr=0.0: must be a finite number > 0"),
        ({"lr": float("nan")}, "lr=nan: must be a finite number > 0"),
        ({"lr": float("inf")}, "lr=inf: must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size=0: must be a whole number >= 1"),
        ({"init": "glorot"}, "init='glorot': use framework, zeros or a number"),
        ({"gpus_per_job": 2.0}, "a single-device job uses at most 1 GPU"),
        ({"gpus_per_job": -1.0}, "gpus_per_job=-1.0: must be a number >= 0"),
        ({"variant": "ddp", "framework": "tensorflow"}, "variant='ddp' is for torch, not tensorflow"),
        ({"variant": "sharded"}, "variant='sharded': choose one of single, mirrored, multiworker, ddp"),
        ({"beta_1": 1.0}, "beta_1=1.0: must be a number in [0, 1)"),
    ],
)
def test_bad_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(SpecError) as error:
        JobSpec(**{"framework": "torch", **fields})
    assert message in str(error.value)


def test_job_ids_are_the_framework_or_numbered_when_repeated():
    specs = [JobSpec("torch"), JobSpec("tensorflow"), JobSpec("torch")]
    assert job_ids(specs) == ["torch-1", "tensorflow", "torch-2"]
