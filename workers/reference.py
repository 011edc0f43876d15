"""The exact least-squares optimum, the noise floor, and the rules that judge a trained model.

A linear model is judged against the least-squares optimum (classify_convergence); a
model with no exact optimum (an MLP, a user's model) against the noise floor of
synthetic data, or, without one, by whether its loss stopped falling (classify_fit).
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

# Without a known best loss, a model has converged when its loss has plateaued: over the
# last tenth of the epochs (at least one epoch back) the loss fell by at most this
# fraction of its final value. The README states it.
PLATEAU_TOLERANCE = 1e-3


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

    A target with no variance has no R^2; see _relative_to_variance for the gap then.
    """
    return _relative_to_variance(dataset, loss - reference.loss)


def floor_gap(dataset: Dataset, loss: float) -> float | None:
    """How far the model's R^2 falls short of the true function's: (loss - noise floor) / variance(y).

    None when the dataset has no noise floor (a CSV, the article's houses). A negative gap
    means the model fit the drawn rows better than the function that made them: it
    learnt part of their noise (see fits_noise). A target with no variance is handled as
    in r2_gap.
    """
    if dataset.noise_floor is None:
        return None
    return _relative_to_variance(dataset, loss - dataset.noise_floor)


def fits_noise(gap: float | None) -> bool:
    """True when a floor gap is below -CONVERGED_R2_GAP: the model fit the noise of the drawn rows.

    Its loss is further below the true function's than the convergence rule tolerates
    above it, which a model can only reach by memorising noise, not by learning f(X).
    """
    return gap is not None and gap < -CONVERGED_R2_GAP


def _relative_to_variance(dataset: Dataset, loss_difference: float) -> float:
    """A loss difference as a share of the target's variance: a difference in R^2.

    A target with no variance (every row the same value, up to rounding) has no R^2:
    dividing by its variance, zero or a rounding residue, would turn any difference into
    an astronomic gap. The gap is then the loss difference itself, in the target's
    squared units: 0 for a model that reproduces the constant, and judged against
    CONVERGED_R2_GAP like any other gap. "No variance" means a variance no larger than
    float64 rounding of the target's values can leave behind.
    """
    target = dataset.target
    variance = float(np.var(target))
    scale = float(np.max(np.abs(target))) if target.size else 0.0
    rounding = (64 * np.finfo(np.float64).eps * scale) ** 2
    if variance <= rounding:
        return loss_difference
    return loss_difference / variance


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
    history_finite = bool(np.isfinite(np.asarray(loss_history, dtype=np.float64)).all())
    if not (parameters_finite and history_finite and math.isfinite(final_loss)):
        return "diverged"
    if loss_history and loss_history[-1] > loss_history[0]:
        return "diverged"
    if r2_gap(dataset, final_loss, reference) <= CONVERGED_R2_GAP:
        return "converged"
    return "not_converged"


def classify_fit(loss_history: list[float], final_loss: float, dataset: Dataset) -> str:
    """`diverged`, `converged` or `not_converged`, for a model with no exact optimum (mlp, user models).

    diverged: the final loss or any loss in the history is not finite, or the last loss
    in the history is above the first. converged, when the dataset has a noise floor:
    floor_gap <= CONVERGED_R2_GAP, that is (final loss - noise floor) / variance(y) is at
    most CONVERGED_R2_GAP. converged, when it has none: the loss has plateaued, that is,
    with one loss an epoch and k = max(1, len(history) // 10) epochs back,
    (history[-k-1] - history[-1]) / max(history[-1], tiny) <= PLATEAU_TOLERANCE, tiny
    being the smallest positive float64. Anything else did not converge (for example too
    few epochs, or a history too short to show a plateau).

    The history may be in standardised training units while final_loss is in the data's
    units, so the history decides only the scale-free parts (diverged, plateaued) and
    final_loss the floor gap.
    """
    history = [float(value) for value in loss_history]
    if not (math.isfinite(final_loss) and np.isfinite(np.asarray(history)).all()):
        return "diverged"
    if history and history[-1] > history[0]:
        return "diverged"
    gap = floor_gap(dataset, final_loss)
    if gap is not None:
        return "converged" if gap <= CONVERGED_R2_GAP else "not_converged"
    back = max(1, len(history) // 10)
    if len(history) <= back:
        return "not_converged"
    last = history[-1]
    relative_decrease = (history[-back - 1] - last) / max(last, np.finfo(np.float64).tiny)
    return "converged" if relative_decrease <= PLATEAU_TOLERANCE else "not_converged"
