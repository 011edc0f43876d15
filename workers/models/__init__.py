"""The model registry: what a job trains, described without importing any framework.

A job's `model` field names a built-in model (`linear`, `mlp`) or a user model (a
Python file or an importable module with `build_tensorflow`, `build_torch` and/or
`build_jax`). `plan(job, feature_count)` turns it into a `ModelPlan`, which every
framework builds in its own terms:

- a dense stack (`DenseLayer`s, each an affine map followed by an activation), which
  each framework builds from its own layers (Keras Dense, torch nn.Linear, JAX arrays);
- or a user model, whose builder the framework calls.

The plan also fixes the canonical parameter layout (`ModelPlan.layout`): each dense
layer's kernel as [inputs, outputs], then its bias [outputs], layer by layer. It is the
order and shape in which a shared start is drawn (workers/models/shared_start.py), in
which parameters are recorded, and in which frameworks hand their learned parameters
back (torch's nn.Linear stores the kernel transposed; its trainer transposes it).

Adding a built-in model takes one module here with `NAME` and `plan(job, feature_count)`,
and its name in `BUILT_IN`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

# The built-in models and the module that plans each; any other `model` value is a user model.
BUILT_IN = {"linear": "workers.models.linear", "mlp": "workers.models.mlp"}
ACTIVATIONS = ("relu", "tanh", "gelu")
DTYPES = ("float32", "float64")


class ModelSettings(Protocol):
    """The job fields a model's plan reads (workers.training.TrainingJob has them)."""

    @property
    def model(self) -> str: ...
    @property
    def hidden(self) -> tuple[int, ...]: ...
    @property
    def activation(self) -> str: ...
    @property
    def model_args(self) -> tuple[tuple[str, Any], ...]: ...
    @property
    def model_source(self) -> UserModelSource | None: ...


@dataclass(frozen=True)
class DenseLayer:
    """x @ kernel + bias, then the activation: `linear` (none), relu, tanh or gelu (exact, erf)."""

    inputs: int
    outputs: int
    activation: str = "linear"


@dataclass(frozen=True)
class UserModelSource:
    """A user model's code as the driver read it: shipped to workers, so they need no copy of the file."""

    name: str  # the path or module name the job gave, for messages
    filename: str  # what tracebacks name: the file's path on the submitting machine
    text: str
    digest: str  # sha256 of the text: part of the job's id and of a warm worker's fitness


@dataclass(frozen=True)
class ModelPlan:
    """What a framework builds for a job: a dense stack, or a user model's builder."""

    name: str  # linear, mlp, or the user model's path or module
    feature_count: int
    layers: tuple[DenseLayer, ...] = ()  # a dense stack; empty for a user model
    user: UserModelSource | None = None
    arguments: tuple[tuple[str, Any], ...] = ()  # the user's model_args

    @property
    def is_linear(self) -> bool:
        """One dense layer without activation: y = x . w + b, which has an exact optimum."""
        return self.user is None and len(self.layers) == 1 and self.layers[0].activation == "linear"

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The canonical (name, shape) of every parameter of a dense stack, in order."""
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for index, layer in enumerate(self.layers):
            shapes.append((f"dense_{index}/kernel", (layer.inputs, layer.outputs)))
            shapes.append((f"dense_{index}/bias", (layer.outputs,)))
        return shapes


def is_built_in(model: str) -> bool:
    return model in BUILT_IN


def plan(job: ModelSettings, feature_count: int) -> ModelPlan:
    """The job's model for data with `feature_count` features."""
    if is_built_in(job.model):
        return importlib.import_module(BUILT_IN[job.model]).plan(job, feature_count)
    if job.model_source is None:
        raise ValueError(
            f"model={job.model!r}: a user model's code was not shipped with the job; submit it with runjobs"
        )
    return ModelPlan(job.model, feature_count, user=job.model_source, arguments=job.model_args)


def dense_stack(name: str, feature_count: int, hidden: tuple[int, ...], activation: str) -> ModelPlan:
    """`hidden` layers with `activation`, then one linear output per row."""
    sizes = (feature_count, *hidden, 1)
    layers = tuple(
        DenseLayer(inputs, outputs, activation if index < len(hidden) else "linear")
        for index, (inputs, outputs) in enumerate(zip(sizes[:-1], sizes[1:]))
    )
    return ModelPlan(name, feature_count, layers)


def read_user_model(model: str) -> UserModelSource:
    """A user model's code, read where the job is planned (workers/models/user.py)."""
    from workers.models import user

    return user.read_source(model)
