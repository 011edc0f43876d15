"""A warm TensorFlow worker reuses its traced loop across jobs, and the results do not change.

Runs the framework in this process (no Ray): the point is the worker's state from one job
to the next, which only a second job in the same process can show. That state belongs to
the process's framework object, the one the registry hands out; a new object is a cold
worker.
"""

from __future__ import annotations

import numpy as np
import pytest

from jobs.plan.spec import JobSpec
from workers import frameworks, models
from workers.data import article_dataset
from workers.training import Scaling, TrainingData

pytestmark = pytest.mark.slow


def train(framework, spec):
    spec = spec.for_worker()
    dataset = article_dataset()
    data = TrainingData.prepare(dataset, Scaling.identity(1), np.array([[1800.0]]))
    device = framework.initialise((), False, spec)
    return framework.train(spec, models.plan(spec, 1), data, device)


def cold_tensorflow():
    """A TensorFlow framework object with nothing traced yet, as a fresh worker process has."""
    warm = frameworks.get("tensorflow")
    return type(warm)(frameworks.describe("tensorflow"))


@pytest.mark.parametrize("init", ["framework", "zeros"])
def test_second_job_reuses_the_traced_loop_and_matches_a_cold_run(init):
    framework = frameworks.get("tensorflow")
    # Mini-batches, so the seed also drives the shuffle inside the traced loop.
    first = JobSpec("tensorflow", epochs=30, lr=0.01, seed=0, init=init, batch_size=4)
    second = JobSpec("tensorflow", epochs=40, lr=0.1, seed=1, init=init, batch_size=4)

    train(framework, first)
    traced = framework.traced_loop
    assert traced is not None
    warm = train(framework, second)
    assert framework.traced_loop is traced, "the second job should have reused the first job's traced loop"
    assert frameworks.get("tensorflow") is framework, "the registry keeps one framework object per process"

    cold_framework = cold_tensorflow()
    cold = train(cold_framework, second)
    assert cold_framework.traced_loop is not traced
    assert framework.traced_loop is traced, "another framework object must not touch this one's loop"

    assert len(warm.loss_history) == 40
    np.testing.assert_array_equal(warm.loss_history, cold.loss_history)
    np.testing.assert_array_equal(warm.parameter_history, cold.parameter_history)
    np.testing.assert_array_equal(warm.predictions, cold.predictions)


def test_a_different_optimizer_or_batch_traces_anew():
    framework = frameworks.get("tensorflow")
    train(framework, JobSpec("tensorflow", epochs=5, optimizer="adam"))
    traced = framework.traced_loop
    train(framework, JobSpec("tensorflow", epochs=5, optimizer="sgd"))
    assert framework.traced_loop is not traced
    traced = framework.traced_loop
    train(framework, JobSpec("tensorflow", epochs=5, optimizer="sgd", batch_size=5))
    assert framework.traced_loop is not traced
