"""The early-stopping rule a spec file sets: which rule, how often jobs report, and its limits.

    stopping: {rule: median, every: 10, grace: 50, min_jobs: 3}
    stopping: {rule: halving, every: 10, grace: 50, reduction: 3}

jobs/run/stopping.py applies it to the losses running jobs report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.plan.fields import SpecError, settings_mapping

RULES = ("median", "halving")
SETTINGS = ("rule", "every", "grace", "min_jobs", "reduction")


@dataclass(frozen=True)
class StoppingRule:
    rule: str
    every: int = 10
    grace: int = 50
    min_jobs: int = 3
    reduction: int = 3

    @classmethod
    def parse(cls, where: str, value: Any) -> StoppingRule:
        usage = "e.g. stopping: {rule: median, every: 10, grace: 50}"
        value = settings_mapping(where, "stopping", value, SETTINGS, usage)
        rule = value.get("rule")
        if rule not in RULES:
            raise SpecError(f"{where}: stopping.rule={rule!r}: choose {' or '.join(RULES)}, {usage}")
        numbers = {key: value.get(key, getattr(cls, key)) for key in SETTINGS[1:]}
        lowest = {"every": 1, "grace": 0, "min_jobs": 1, "reduction": 2}
        for key, number in numbers.items():
            if not isinstance(number, int) or isinstance(number, bool) or not lowest[key] <= number <= 10**9:
                raise SpecError(
                    f"{where}: stopping.{key}={number!r}: give a whole number from {lowest[key]} to 10**9"
                )
        if rule == "halving" and numbers["grace"] % numbers["every"]:
            # Rungs fall at grace x reduction^k: each must be an epoch jobs report at, or a
            # running job would be judged on a later epoch than the jobs it is compared with.
            raise SpecError(
                f"{where}: stopping.grace={numbers['grace']} must be a multiple of stopping.every="
                f"{numbers['every']} for the halving rule (its rungs are grace x reduction^k epochs)"
            )
        return cls(rule, **numbers)

    def described(self) -> dict[str, Any]:
        shown = {"rule": self.rule, "every": self.every, "grace": self.grace}
        if self.rule == "median":
            return {**shown, "min_jobs": self.min_jobs}
        return {**shown, "reduction": self.reduction}

    def rungs_up_to(self, epochs: int) -> list[int]:
        """The halving rule's rungs, in epochs, up to `epochs`."""
        rungs, rung = [], max(self.grace, self.every)
        while rung <= epochs:
            rungs.append(rung)
            rung *= self.reduction
        return rungs
