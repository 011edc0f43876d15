"""`--keep-warm`: how long a run's warm workers stay on a running cluster after it, for the next submit.

The setting alone; jobs/run/warm_pool.py keeps the workers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.plan.spec import SpecError

DEFAULT_CPU_KEEP_S = 600.0


@dataclass(frozen=True)
class KeepWarm:
    """How long a run's warm workers stay after it, idle, for the next submit (seconds).

    `given`: whether --keep-warm was given; without it GPU workers are not kept.
    """

    seconds: float = DEFAULT_CPU_KEEP_S
    given: bool = False

    def for_kind(self, gpus: float) -> float:
        if gpus and not self.given:
            return 0.0
        return self.seconds

    def keeps_any(self) -> bool:
        return self.seconds > 0


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_warm(text: str) -> KeepWarm:
    """`--keep-warm`: a duration such as 90s, 10m, 1h or 600 (seconds); 0 keeps nothing."""
    found = DURATION.match(text or "")
    if found is None:
        raise SpecError(
            f"--keep-warm {text!r}: give a duration such as 90s, 10m or 1h (a bare number is seconds), "
            "or 0 to end the warm workers with the run"
        )
    seconds = float(found.group(1)) * UNIT_SECONDS[found.group(2)]
    if seconds > 7 * 24 * 3600:
        raise SpecError(f"--keep-warm {text!r}: at most 168h (a week); idle workers hold CPUs and GPUs")
    return KeepWarm(seconds, given=True)
