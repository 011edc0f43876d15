"""What every framework's training shares: the arrays it trains on, unit scaling, and what it hands back.

Frameworks (workers/frameworks/) see only float32 arrays in training units; this module
standardises the data when asked (`normalize`) and maps the learned parameters back to
the data's own units, so every framework is judged on the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.data import Dataset
from workers.models import UserModelSource


@dataclass(frozen=True)
class TrainingJob:
    """What a worker needs to train one job: the only job object that crosses into the data plane.

    The control plane builds it from a job's spec (`JobSpec.for_worker()`, jobs/plan/spec.py)
    once everything in it is resolved; the spec's other fields (where the job runs, its
    retries, timeouts and label) never reach a worker.
    """

    framework: str
    variant: str = "single"
    workers: int = 1
    epochs: int = 500
    optimizer: str = "adam"
    lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    batch_size: int | None = None  # None: the full data
    seed: int = 0
    initial_value: float | None = 0.0  # None: the framework's own initialiser
    shared_start: bool = False  # draw every parameter in numpy (workers/models/shared_start.py)
    model: str = "linear"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    model_args: tuple[tuple[str, Any], ...] = ()
    model_source: UserModelSource | None = None  # a user model's code, read by the driver
    dtype: str = "float32"
    normalize: bool = False
    predict: tuple[tuple[float, ...], ...] = ()
    allow_cpu_fallback: bool = False
    loop: str = "fast"
    save_models: bool = False
    # Epochs between loss reports to the job's monitor (workers/reporting.py), which may
    # answer stop; None: no reports, and the loop runs whole. Only single-device jobs report.
    report_every: int | None = None


@dataclass(frozen=True)
class Scaling:
    """x_train = (x - feature_mean) / feature_scale and y_train = (y - target_mean) / target_scale."""

    feature_mean: np.ndarray
    feature_scale: np.ndarray
    target_mean: float
    target_scale: float

    @classmethod
    def identity(cls, feature_count: int) -> Scaling:
        return cls(np.zeros(feature_count), np.ones(feature_count), 0.0, 1.0)

    @classmethod
    def standardise(cls, dataset: Dataset) -> Scaling:
        # A constant column has no spread to divide by; leave its scale at 1.
        feature_scale = dataset.features.std(axis=0)
        feature_scale[feature_scale == 0] = 1.0
        target_scale = float(dataset.target.std()) or 1.0
        return cls(dataset.features.mean(axis=0), feature_scale, float(dataset.target.mean()), target_scale)

    def scale_features(self, features: np.ndarray) -> np.ndarray:
        return (features - self.feature_mean) / self.feature_scale

    def scale_target(self, target: np.ndarray) -> np.ndarray:
        return (target - self.target_mean) / self.target_scale

    def original_target(self, target: np.ndarray) -> np.ndarray:
        return np.asarray(target, dtype=np.float64) * self.target_scale + self.target_mean

    def original_parameters(self, weights: np.ndarray, bias: float) -> tuple[np.ndarray, float]:
        """Undo the scaling: y = x_train . w + b becomes y = x . w' + b' in the data's units."""
        with np.errstate(all="ignore"):  # diverged parameters stay inf or nan, judged later
            original_weights = np.asarray(weights, dtype=np.float64) * self.target_scale / self.feature_scale
            original_bias = (
                self.target_mean
                + self.target_scale * float(bias)
                - float(original_weights @ self.feature_mean)
            )
        return original_weights, original_bias

    def original_stack(self, parameters: list[np.ndarray]) -> list[np.ndarray]:
        """A dense stack's parameters in the data's units: the scaling folded into its first and last layer.

        The first layer sees x_train = (x - mean) / scale, so its kernel divided row-wise by
        the scale and its bias less (mean / scale) @ kernel take x itself; the output
        y = y_train * target_scale + target_mean is the last layer's kernel and bias scaled
        the same way. Exact for any stack, since each layer is affine before its activation.
        """
        folded = [np.asarray(parameter, dtype=np.float64).copy() for parameter in parameters]
        with np.errstate(all="ignore"):
            first_kernel = folded[0]
            folded[1] = folded[1] - (self.feature_mean / self.feature_scale) @ first_kernel
            folded[0] = first_kernel / self.feature_scale[:, None]
            folded[-2] = folded[-2] * self.target_scale
            folded[-1] = folded[-1] * self.target_scale + self.target_mean
        return folded

    def original_parameter_history(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """original_parameters for every row [w_1..w_K, b] of a per-epoch history, at once."""
        history = np.asarray(history, dtype=np.float64).reshape(len(history), -1)
        with np.errstate(all="ignore"):
            weights = history[:, :-1] * self.target_scale / self.feature_scale
            bias = self.target_mean + self.target_scale * history[:, -1] - weights @ self.feature_mean
        return weights, bias


@dataclass(frozen=True)
class TrainingData:
    features: np.ndarray  # (rows, feature_count), training units, the job's dtype
    target: np.ndarray  # (rows, 1), training units, the job's dtype
    prediction_inputs: np.ndarray  # (points, feature_count), training units, the job's dtype

    @classmethod
    def prepare(
        cls, dataset: Dataset, scaling: Scaling, prediction_inputs: np.ndarray, dtype: str = "float32"
    ) -> TrainingData:
        return cls(
            features=scaling.scale_features(dataset.features).astype(dtype),
            target=scaling.scale_target(dataset.target).astype(dtype).reshape(-1, 1),
            prediction_inputs=scaling.scale_features(prediction_inputs).astype(dtype),
        )

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class Device:
    """Where a job trained: the framework's device name and Ray's GPU assignment."""

    name: str  # "cpu", "cuda:0", "/GPU:0"
    gpu_ids: tuple[str, ...] = ()
    cpu_fallback: bool = False  # Ray assigned a GPU but CUDA was not usable here
    replica_names: tuple[str, ...] = ()  # a mirrored job's devices, one per replica


@dataclass
class TrainerOutcome:
    """A framework's training result (Framework.train), still in training units."""

    # Every learned parameter in the canonical layout (workers/models/__init__.py), float64.
    parameters: list[np.ndarray]
    # One entry per epoch trained: all of the job's epochs, or fewer when it was stopped
    # early. An epoch's seconds are its computation, not the reports between chunks.
    loss_history: list[float]
    epoch_seconds: list[float]
    # (epochs trained, P): each epoch's parameters at its end, flattened in layout order, for the
    # linear model ([w_1..w_K, b]); None for larger models, whose history would be too big.
    parameter_history: np.ndarray | None
    predictions: np.ndarray  # at the job's prediction inputs, training units
    setup_s: float
    train_s: float
    predict_s: float
    # The model's outputs on the training features (training units), beyond the linear
    # model, whose final loss is computed from its parameters instead.
    fitted: np.ndarray | None = None
    # A user model's parameter names as its framework calls them (a dense stack's are the plan's).
    parameter_names: list[str] = field(default_factory=list)
    # For multi-device variants: the strategy or backend and the devices it used.
    distribution: dict = field(default_factory=dict)
    # Which update rule trained the parameters: runjobs' own (the same arithmetic in every
    # framework, loop=fast) or the framework's stock optimizer (loop=article).
    update_rule: str = ""
    # The epochs actually trained when the job's monitor stopped it early (the histories
    # then hold that many epochs); None when it trained every epoch it was given.
    stopped_at_epoch: int | None = None

    @property
    def weights(self) -> np.ndarray:
        """The linear model's w: its one kernel, flattened."""
        return np.asarray(self.parameters[0], dtype=np.float64).reshape(-1)

    @property
    def bias(self) -> float:
        """The linear model's b."""
        return float(np.asarray(self.parameters[1]).reshape(-1)[0])

    def distribution_fields(self) -> dict:
        """`strategy` (TensorFlow) or `backend` (torch) for the result, when distributed."""
        return {key: value for key, value in self.distribution.items() if key in ("strategy", "backend")}


def batch_size_for(requested: int | None, rows: int) -> int:
    """The rows per step: the full data when no batch size is set, never more than the data."""
    return rows if requested is None else min(requested, rows)
