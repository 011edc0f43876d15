"""`mlp`: dense layers of `hidden` sizes with `activation` (relu, tanh, gelu), then one linear output."""

from __future__ import annotations

from workers.models import ModelPlan, ModelSettings, dense_stack

NAME = "mlp"


def plan(job: ModelSettings, feature_count: int) -> ModelPlan:
    return dense_stack(NAME, feature_count, tuple(job.hidden), job.activation)
