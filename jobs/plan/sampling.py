"""Random search: a spec file's `sample:` distributions and the configs drawn from them.

    sample:
      lr: {loguniform: [0.001, 0.1]}     # e^U(ln a, ln b)
      beta_1: {uniform: [0.8, 0.99]}     # U(a, b)
      seed: {randint: [0, 1000]}         # a whole number from a to b, both included
      hidden: {choice: [[32], [64, 64]]} # one of the listed values
    samples: 16                          # configs drawn
    sample_seed: 7                       # default 0

The draws come from numpy's PCG64 generator seeded with `sample_seed`, sample by sample,
each sample's fields in the order the file lists them: the same file draws the same
configs on every machine, and raising `samples` keeps the configs already drawn and adds
new ones. A drawn config is an ordinary job (its id hashes its fields), so re-running the
file into its directory runs only what has no result yet. Two samples that draw the
same values are one job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jobs.plan.fields import SpecError

KINDS = ("loguniform", "uniform", "randint", "choice")


@dataclass(frozen=True)
class Distribution:
    kind: str
    arguments: tuple[Any, ...]

    def draw(self, generator) -> Any:
        if self.kind == "uniform":
            low, high = self.arguments
            return float(generator.uniform(low, high))
        if self.kind == "loguniform":
            low, high = self.arguments
            return float(math.exp(generator.uniform(math.log(low), math.log(high))))
        if self.kind == "randint":
            low, high = self.arguments
            return int(generator.integers(low, high, endpoint=True))
        return self.arguments[int(generator.integers(len(self.arguments)))]


def parse(where: str, sample: Any, grid: dict[str, Any]) -> dict[str, Distribution]:
    """A spec file's `sample:` mapping, each entry checked; `where` names the file for errors."""
    if not isinstance(sample, dict):
        raise SpecError(
            f"{where}: sample is a mapping of job fields to distributions, e.g. lr: {{uniform: [0.01, 0.1]}}"
        )
    distributions = {}
    for field, text in sample.items():
        if field in grid:
            raise SpecError(f"{where}: {field} is both in grid and in sample; give it in one of them")
        distributions[str(field)] = _distribution(f"{where}: sample.{field}", text)
    return distributions


def _distribution(where: str, value: Any) -> Distribution:
    usage = f"give one of {', '.join(f'{{{kind}: ...}}' for kind in KINDS)}"
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(f"{where}: {usage}")
    ((kind, arguments),) = value.items()
    if kind not in KINDS:
        raise SpecError(f"{where}: unknown distribution {kind!r}; {usage}")
    if kind == "choice":
        if not isinstance(arguments, list) or not arguments:
            raise SpecError(f"{where}: choice takes a non-empty list of values")
        return Distribution(kind, tuple(arguments))
    if not (isinstance(arguments, list) and len(arguments) == 2):
        raise SpecError(f"{where}: {kind} takes [low, high]")
    low, high = arguments
    if kind == "randint":
        if (
            not all(isinstance(bound, int) and not isinstance(bound, bool) for bound in (low, high))
            or low > high
        ):
            raise SpecError(f"{where}: randint takes whole numbers [low, high] with low <= high")
        return Distribution(kind, (low, high))
    if not all(_finite_number(bound) for bound in (low, high)) or not low < high:
        raise SpecError(f"{where}: {kind} takes finite numbers [low, high] with low < high")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform takes low > 0 (it draws the logarithm uniformly)")
    return Distribution(kind, (float(low), float(high)))


def draw(distributions: dict[str, Distribution], samples: int, seed: int) -> list[dict[str, Any]]:
    """`samples` configs: each field's value drawn in order from one seeded generator."""
    import numpy as np

    generator = np.random.default_rng(seed)
    return [
        {field: distribution.draw(generator) for field, distribution in distributions.items()}
        for _ in range(samples)
    ]


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
