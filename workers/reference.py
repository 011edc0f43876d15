"""The exact least-squares optimum and the rule that judges a trained model against it.

Everything here is float64 numpy, independent of either framework, so a worker (or a
report rebuilt later) can check any learned parameters against the best possible fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.data import Dataset

# A model has converged when its R^2 is within this of the best achievable R^2, that is
# when (loss - optimal loss) <= CONVERGED_R2_GAP * variance(target). The README states it.
CONVERGED_R2_GAP = 1e-3


@dataclass(frozen=True)
class LinearFit:
    weights: np.ndarray
    bias: float
    loss: float  # mean squared error on the dataset


def least_squares(dataset: Dataset) -> LinearFit:
    """Solve min ||X w + b - y||^2 exactly, in float64.

    Centering first removes the bias column from the solve, which keeps the problem well
    conditioned when features are large (square feet) and the intercept is small.
    """
    feature_mean = dataset.features.mean(axis=0)
    target_mean = float(dataset.target.mean())
    centered_features = dataset.features - feature_mean
    weights, *_ = np.linalg.lstsq(centered_features, dataset.target - target_mean, rcond=None)
    bias = target_mean - float(feature_mean @ weights)
    return LinearFit(weights, bias, mean_squared_error(dataset, weights, bias))


def mean_squared_error(dataset: Dataset, weights: np.ndarray, bias: float) -> float:
    with np.errstate(all="ignore"):  # diverged parameters give inf or nan, judged below
        residuals = dataset.features @ np.asarray(weights, dtype=np.float64) + bias - dataset.target
        return float(np.mean(residuals * residuals))


def r2_gap(dataset: Dataset, loss: float, reference: LinearFit) -> float:
    """How far the model's R^2 falls short of the optimum's: (loss - optimum) / variance(y).

    A target with no variance (every row the same value, up to rounding) has no R^2:
    dividing by its variance, zero or a rounding residue, would turn any difference into
    an astronomic gap. The gap is then the loss difference itself, loss - optimum, in the
    target's squared units: 0 for a model that reproduces the constant, and judged
    against CONVERGED_R2_GAP like any other gap. "No variance" means a variance no
    larger than float64 rounding of the target's values can leave behind.
    """
    target = dataset.target
    variance = float(np.var(target))
    scale = float(np.max(np.abs(target))) if target.size else 0.0
    rounding = (64 * np.finfo(np.float64).eps * scale) ** 2
    if variance <= rounding:
        return loss - reference.loss
    return (loss - reference.loss) / variance


def classify_convergence(
    dataset: Dataset,
    weights: np.ndarray,
    bias: float,
    loss_history: list[float],
    reference: LinearFit,
) -> str:
    """`diverged`, `converged` or `not_converged`.

    diverged: a parameter or the final loss is not finite, or training ended with a higher
    loss than it started with. converged: the R^2 gap to the optimum is at most
    CONVERGED_R2_GAP. Anything else did not converge (for example too few steps).
    """
    parameters_finite = all(math.isfinite(float(value)) for value in weights) and math.isfinite(bias)
    final_loss = mean_squared_error(dataset, weights, bias)
    history_finite = all(math.isfinite(value) for value in loss_history)
    if not (parameters_finite and history_finite and math.isfinite(final_loss)):
        return "diverged"
    if loss_history and loss_history[-1] > loss_history[0]:
        return "diverged"
    if r2_gap(dataset, final_loss, reference) <= CONVERGED_R2_GAP:
        return "converged"
    return "not_converged"
