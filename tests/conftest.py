"""Shared fixtures: one embedded Ray for the session, a CLI runner, and a clean environment.

Tests own every Ray process they start and end it by handle: the session's Ray with
`ray.shutdown()`, a `ray start --block` head by terminating the process they spawned.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import running_head


@pytest.fixture(autouse=True)
def restore_environment():
    """Tests may set RAY_ADDRESS and friends; every test starts from the same environment."""
    saved = dict(os.environ)
    os.environ.pop("RAY_ADDRESS", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray with 2 CPUs and no GPUs for every test that runs jobs in-process."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head_with_declared_gpus(tmp_path_factory):
    """A separate `ray start --head` that declares 2 GPUs this machine does not have.

    Yields its GCS address. Ended by terminating the `ray start --block` process it
    spawned (which stops its children).
    """
    arguments = ("--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "false")
    with running_head(tmp_path_factory.mktemp("ray-head"), *arguments) as address:
        yield address
