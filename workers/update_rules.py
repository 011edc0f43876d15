"""runjobs' own update rules: the same arithmetic in every framework under `loop=fast`.

Stock optimizers differ in small ways that a cross-framework comparison would report as
disagreement: Keras keeps Adam's learning rate as a float32 variable and adds epsilon to
the uncorrected sqrt(v); torch.optim.Adam adds it to the bias-corrected one. In float64
on a 2 x 12 tanh mlp the two drift 5e-5 apart in the loss after 150 epochs, while the
rule below, written out in each framework, agrees to about 1e-15. So under `loop=fast`
each framework runs these rules with its own operations, in the parameters' dtype and in
this order; `loop=article` keeps each framework's stock optimizer and its fit, as the
source article did. A result names the rule that ran (`update_rule`).

Adam (Kingma and Ba, as torch.optim.Adam computes it), for step t = 1, 2, ...:

    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g * g
    p = p - lr * (m / (1 - beta_1 ** t)) / (sqrt(v / (1 - beta_2 ** t)) + epsilon)

SGD: p = p - lr * g.

`step` below is the rule in numpy: the reference the frameworks' versions are tested against.
"""

from __future__ import annotations

import numpy as np

OWN_RULE = {"adam": "runjobs adam", "sgd": "runjobs sgd"}


def stock_rule(framework: str, optimizer: str) -> str:
    """The name a result gives a framework's stock optimizer (loop=article)."""
    return f"{framework} {optimizer} (stock)"


def bias_corrections(beta_1: float, beta_2: float, step: int) -> tuple[float, float]:
    """1 - beta_1**t and 1 - beta_2**t for step t (counted from 1)."""
    return 1.0 - beta_1**step, 1.0 - beta_2**step


def step(
    parameters: list[np.ndarray],
    gradients: list[np.ndarray],
    moments: list[tuple[np.ndarray, np.ndarray]],
    step_number: int,
    optimizer: str,
    lr: float,
    beta_1: float,
    beta_2: float,
    epsilon: float,
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """One update of every parameter; returns the new parameters and Adam's moments."""
    if optimizer == "sgd":
        return [parameter - lr * gradient for parameter, gradient in zip(parameters, gradients)], moments
    correction_1, correction_2 = bias_corrections(beta_1, beta_2, step_number)
    updated, new_moments = [], []
    for parameter, gradient, (first, second) in zip(parameters, gradients, moments):
        first = beta_1 * first + (1 - beta_1) * gradient
        second = beta_2 * second + (1 - beta_2) * gradient * gradient
        updated.append(parameter - lr * (first / correction_1) / (np.sqrt(second / correction_2) + epsilon))
        new_moments.append((first, second))
    return updated, new_moments
