"""The shared start: every parameter drawn once, seeded, in numpy, in the canonical layout.

Each framework loads these arrays into its own model (workers/models/__init__.py
describes the layout), so the same model starts from identical parameters in
TensorFlow, torch and JAX. The draw depends only on the seed and the layout's shapes:

- a parameter of two or more dimensions (a kernel, [inputs, outputs]) is Glorot
  uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), fan_in the product of all
  but the last dimension and fan_out the last;
- a one-dimensional parameter (a bias) starts at 0.

The values are drawn in float64 from `numpy.random.default_rng(seed)`, parameter by
parameter in layout order, and cast to the job's dtype.
"""

from __future__ import annotations

import math

import numpy as np


def draw(shapes: list[tuple[int, ...]], seed: int, dtype: str = "float64") -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    parameters = []
    for shape in shapes:
        if len(shape) >= 2:
            fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            values = generator.uniform(-limit, limit, size=shape)
        else:
            values = np.zeros(shape)
        parameters.append(values.astype(dtype))
    return parameters


def describe_layout(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    """A layout in one line, for errors that compare two of them."""
    return ", ".join(f"{name} {list(shape)}" for name, shape in layout) or "no parameters"
