"""Multi-node placement on a real two-node Ray cluster on one machine.

Two raylets on loopback (`ray start --head` and `ray start --address`), each declaring
2 CPUs and 2 GPUs this machine does not have: jobs are placed by Ray's GPU assignment on
both nodes, train on the CPU with the GPUs recorded as fallback, and survive a node
that leaves mid-sweep. The CLI runs as its own process against the head's address.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from jobs.record.ledger import Ledger
from tests.helpers import RUNJOBS, RayNode, free_port, ledger_states, load_strict_json

pytestmark = pytest.mark.slow


class TwoNodeCluster:
    def __init__(self, directory):
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.head = RayNode.head(
            directory / "head.log", port, "--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "false"
        )
        try:
            self.worker = RayNode.worker(
                directory / "worker.log", self.address, "--num-cpus", "2", "--num-gpus", "2"
            )
        except AssertionError:
            self.head.stop()
            raise

    def stop(self) -> None:
        self.worker.stop()
        self.head.stop()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("two-nodes"))
    try:
        yield cluster.address
    finally:
        cluster.stop()


def submit(address: str, output, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUNJOBS, "submit", "--address", address, "--output", str(output), "--allow-cpu-fallback", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def write_spec(directory, text):
    path = directory / "sweep.yaml"
    path.write_text(text)
    return path


def test_four_one_gpu_jobs_land_on_both_nodes_never_sharing_a_gpu(two_nodes, tmp_path):
    spec = write_spec(
        tmp_path,
        "name: spread\ndefaults: {epochs: 3000, gpus_per_job: 1, packing: off}\n"
        "grid: {framework: [tensorflow, torch], seed: [0, 1]}\n",
    )
    result = submit(two_nodes, tmp_path / "run", str(spec), "--wait-for-nodes", "2")
    assert result.returncode == 0, result.stderr
    report = load_strict_json(tmp_path / "run" / "report.json")
    assert report["cluster"]["nodes"] == 2 and report["cluster"]["gpus"] == 4
    placements = [job["placement"] for job in report["jobs"]]
    assert len({placement["node_id"] for placement in placements}) == 2, "all jobs landed on one node"
    slots = [(placement["node_id"], tuple(placement["gpu_ids"])) for placement in placements]
    assert all(len(gpu_ids) == 1 for _, gpu_ids in slots)
    # Four 1-GPU jobs on four GPUs run at once, so Ray must give each its own (node, GPU).
    assert len(set(slots)) == 4, slots
    for placement in placements:
        assert placement["cuda_visible_devices"] == placement["gpu_ids"][0]
        assert placement["device"] == "cpu" and placement["cpu_fallback"] is True


def test_a_node_that_never_joins_is_exit_3_before_anything_starts(two_nodes, tmp_path):
    environment = {**os.environ, "RUNJOBS_CONNECT_TIMEOUT_S": "2"}
    command = [RUNJOBS, "submit", "--address", two_nodes, "--output", str(tmp_path / "run")]
    result = subprocess.run(
        [*command, "--wait-for-nodes", "3"], capture_output=True, text=True, timeout=120, env=environment
    )
    assert result.returncode == 3, result.stderr
    assert "2 of 3 node(s) joined the cluster" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    run = tmp_path / "run"
    # The directory may hold the planned jobs (the lock is taken before connecting); none ran.
    assert not (run / "ledger.sqlite").exists() or set(ledger_states(run)) <= {"pending"}


def test_multiworker_and_ddp_jobs_spread_over_both_nodes_train_correctly(two_nodes, tmp_path):
    result = submit(
        # The default GPU request: one GPU a device (a worker), as the cluster has GPUs.
        two_nodes, tmp_path / "run", "--variant", "single", "--variant", "multiworker", "--variant", "ddp",
        "--workers", "2", "--set", "placement=spread", "--epochs", "300", "--lr", "0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = load_strict_json(tmp_path / "run" / "report.json")
    jobs = {(job["framework"], job["variant"]): job for job in report["jobs"]}
    for key in (("tensorflow", "multiworker"), ("torch", "ddp")):
        job = jobs[key]
        workers = job["placement"]["workers"]
        assert job["status"] == "succeeded" and job["world_size"] == 2
        assert len({worker["node_id"] for worker in workers}) == 2, f"{key} did not spread: {workers}"
        assert all(worker["cpu_fallback"] and len(worker["gpu_ids"]) == 1 for worker in workers)
        twin = jobs[(key[0], "single")]
        # The same initial parameters and gradients: the distributed job learns its twin's line.
        assert job["params"]["weights"][0] == pytest.approx(twin["params"]["weights"][0], rel=1e-4)
        assert job["params"]["bias"] == pytest.approx(twin["params"]["bias"], rel=1e-4, abs=1e-6)


def test_a_node_lost_mid_sweep_has_its_jobs_retried_and_loses_no_finished_result(tmp_path):
    cluster = TwoNodeCluster(tmp_path)
    output = tmp_path / "run"
    spec = write_spec(
        tmp_path,
        # packing off: each job holds its own GPU, so some land on the node that leaves.
        "name: leave\ndefaults: {framework: torch, epochs: 40000, gpus_per_job: 1, retries: 1,"
        " packing: off}\ngrid: {seed: [0, 1, 2, 3]}\n",
    )
    driver = subprocess.Popen(
        [RUNJOBS, "submit", str(spec), "--address", cluster.address, "--output", str(output),
         "--allow-cpu-fallback"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while ledger_states(output).count("running") < 4:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, ledger_states(output)
            time.sleep(0.5)
        time.sleep(5)  # into training
        cluster.worker.crash()
        stdout, stderr = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        cluster.stop()
    with Ledger.open(output, for_writing=False) as ledger:
        jobs = ledger.jobs()
    assert all(job.status in ("succeeded", "failed") for job in jobs), [(job.id, job.status) for job in jobs]
    retried = [job for job in jobs if job.attempts == 2]
    assert retried, "the jobs on the node that left should have been retried"
    for job in retried:
        assert job.status == "succeeded" or "node" in (job.record or {}).get("error", "").lower()
    report = load_strict_json(output / "report.json")
    assert len(report["jobs"]) == 4
    assert driver.returncode == (0 if all(job.status == "succeeded" for job in jobs) else 1), stderr
