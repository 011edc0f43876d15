"""Shared fixtures: one embedded Ray for the session, a CLI runner, and a clean environment.

Tests own every Ray process they start and end it by handle: the session's Ray with
`ray.shutdown()`, a `ray start --block` head by terminating the process they spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import RAY, free_port


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

    Yields its GCS address. Runs in its own process group, ended by terminating the
    `ray start --block` process this fixture spawned (which stops its children).
    """
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "false",
             "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log_path.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"ray start --head did not come up:\n{log_path.read_text()}")
        time.sleep(0.5)
    try:
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
