"""GPU placement on a real `ray start --head` that declares 2 GPUs this machine lacks.

The CLI runs as a separate process against the head's address, as a user would run it
after `ray start --head --num-gpus 2`: it must present the cluster's token, take Ray's
GPU assignment, fail a job whose framework cannot use that GPU, and fall back to the CPU
only when asked, recording what it really used.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import RUNJOBS, ledger_state, load_strict_json

pytestmark = pytest.mark.slow


def submit(address: str, output, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUNJOBS, "submit", "--address", address, "--output", str(output), "--epochs", "50", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_job_without_usable_cuda_fails_while_the_fallback_job_trains_on_cpu(
    ray_head_with_declared_gpus, tmp_path
):
    result = submit(ray_head_with_declared_gpus, tmp_path / "run", "--set", "torch.allow_cpu_fallback=true")
    assert result.returncode == 1, result.stderr
    report = load_strict_json(tmp_path / "run" / "report.json")
    assert report["cluster"]["gpus"] == 2
    jobs = {job["framework"]: job for job in report["jobs"]}

    tensorflow = jobs["tensorflow"]
    assert tensorflow["status"] == "failed"
    assert tensorflow["config"]["gpus_per_job"] == 1, "a cluster with GPUs gives each job 1 by default"
    assert "DeviceUnavailableError" in tensorflow["error"]
    assert "--allow-cpu-fallback" in tensorflow["error"]

    torch = jobs["torch"]
    assert torch["status"] == "succeeded"
    assert torch["convergence"] in ("converged", "not_converged")
    placement = torch["placement"]
    assert placement["device"] == "cpu" and placement["cpu_fallback"] is True
    assert len(placement["gpu_ids"]) == 1 and placement["gpu_ids"][0] in ("0", "1")
    assert placement["cuda_visible_devices"] == placement["gpu_ids"][0], "Ray's assignment reaches the worker"

    assert "tensorflow failed: DeviceUnavailableError" in result.stdout
    assert ledger_state(tmp_path / "run", "torch") == "succeeded"
    kept = (tmp_path / "run" / "logs" / "tensorflow.err").read_text()
    assert "Traceback" in kept and "DeviceUnavailableError" in kept, "a failed job keeps its traceback"
    assert ledger_state(tmp_path / "run", "tensorflow") == "failed"


def test_fractional_gpus_let_both_frameworks_share_one_gpu(ray_head_with_declared_gpus, tmp_path):
    result = submit(
        ray_head_with_declared_gpus, tmp_path / "run", "--gpus-per-job", "0.5", "--allow-cpu-fallback"
    )
    assert result.returncode == 0, result.stderr
    report = load_strict_json(tmp_path / "run" / "report.json")
    for job in report["jobs"]:
        assert job["config"]["gpus_per_job"] == 0.5
        assert job["placement"]["cpu_fallback"] is True
        assert len(job["placement"]["gpu_ids"]) == 1


def test_gpus_per_job_zero_keeps_jobs_off_the_gpus(ray_head_with_declared_gpus, tmp_path):
    result = submit(ray_head_with_declared_gpus, tmp_path / "run", "--gpus-per-job", "0")
    assert result.returncode == 0, result.stderr
    for job in load_strict_json(tmp_path / "run" / "report.json")["jobs"]:
        assert job["placement"]["gpu_ids"] == [] and job["placement"]["cpu_fallback"] is False


def test_one_gpu_jobs_run_on_warm_workers_that_hold_their_gpu(ray_head_with_declared_gpus, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "defaults: {epochs: 20, gpus_per_job: 1, allow_cpu_fallback: true}\n"
        "grid: {framework: [tensorflow, torch], seed: [0, 1, 2, 3, 4, 5, 6, 7]}\n"
    )
    address, output = ray_head_with_declared_gpus, str(tmp_path / "run")
    result = subprocess.run(
        [RUNJOBS, "submit", str(spec), "--address", address, "--output", output],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = load_strict_json(tmp_path / "run" / "report.json")["jobs"]
    assert len(jobs) == 16 and all(job["status"] == "succeeded" for job in jobs)
    processes: dict[str, dict[int, set[str]]] = {}
    for job in jobs:
        placement = job["placement"]
        assert placement["worker"]["process"] == "warm"
        assert len(placement["gpu_ids"]) == 1 and placement["gpu_ids"][0] in ("0", "1")
        assert placement["cuda_visible_devices"] == placement["gpu_ids"][0], (
            "Ray's assignment reaches the job"
        )
        processes.setdefault(job["framework"], {}).setdefault(placement["pid"], set()).add(
            placement["gpu_ids"][0]
        )
    for framework, by_pid in processes.items():
        assert len(by_pid) <= 2, f"{framework}: at most two worker processes, one a GPU ({by_pid})"
        assert all(len(gpus) == 1 for gpus in by_pid.values()), (
            f"a worker keeps its GPU for its life: {by_pid}"
        )
    # GPU workers are not kept after the run unless --keep-warm says so.
    status = subprocess.run(
        [RUNJOBS, "pool", "status", "--address", ray_head_with_declared_gpus, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert [row for row in json.loads(status.stdout) if row.get("gpu_ids")] == []
