"""A warm TensorFlow worker reuses its traced loop across jobs, and the results do not change.

Runs the trainer in this process (no Ray): the point is the worker's state from one job
to the next, which only a second job in the same process can show.
"""

from __future__ import annotations

import numpy as np
import pytest

from jobs.plan.spec import JobSpec
from workers.data import article_dataset
from workers.training import Scaling, TrainingData

pytestmark = pytest.mark.slow


def train(trainer, spec):
    dataset = article_dataset()
    data = TrainingData.prepare(dataset, Scaling.identity(1), np.array([[1800.0]]))
    device = trainer.initialise((), False, spec)
    return trainer.train(spec, data, device)


@pytest.mark.parametrize("init", ["framework", "zeros"])
def test_second_job_reuses_the_traced_loop_and_matches_a_cold_run(init):
    from workers import tensorflow_trainer as trainer

    # Mini-batches, so the seed also drives the shuffle inside the traced loop.
    first = JobSpec("tensorflow", epochs=30, lr=0.01, seed=0, init=init, batch_size=4)
    second = JobSpec("tensorflow", epochs=40, lr=0.1, seed=1, init=init, batch_size=4)

    train(trainer, first)
    traced = trainer._last_loop
    warm = train(trainer, second)
    assert trainer._last_loop is traced, "the second job should have reused the first job's traced loop"

    trainer._last_loop = None
    cold = train(trainer, second)
    assert trainer._last_loop is not traced

    assert len(warm.loss_history) == 40
    np.testing.assert_array_equal(warm.loss_history, cold.loss_history)
    np.testing.assert_array_equal(warm.parameter_history, cold.parameter_history)
    np.testing.assert_array_equal(warm.predictions, cold.predictions)


def test_a_different_optimizer_or_batch_traces_anew():
    from workers import tensorflow_trainer as trainer

    train(trainer, JobSpec("tensorflow", epochs=5, optimizer="adam"))
    traced = trainer._last_loop
    train(trainer, JobSpec("tensorflow", epochs=5, optimizer="sgd"))
    assert trainer._last_loop is not traced
    traced = trainer._last_loop
    train(trainer, JobSpec("tensorflow", epochs=5, optimizer="sgd", batch_size=5))
    assert trainer._last_loop is not traced
