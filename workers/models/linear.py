"""`linear`: y = x . w + b, one dense layer, the article's model and the default.

It alone has an exact optimum (the least-squares fit, workers/reference.py) that every
job is judged against.
"""

from __future__ import annotations

from workers.models import ModelPlan, ModelSettings, dense_stack

NAME = "linear"


def plan(job: ModelSettings, feature_count: int) -> ModelPlan:
    return dense_stack(NAME, feature_count, (), "linear")
