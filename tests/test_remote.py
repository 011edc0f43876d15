"""Remote submission through Ray Jobs, against real `ray start --head` processes with a dashboard.

The driver runs on the cluster as a Ray Job; the results come back into the local output
directory as each job ends. These tests own their heads and end them by handle.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.helpers import (
    RUNJOBS,
    RayNode,
    free_port,
    ledger_state,
    ledger_states,
    run_cli,
    started_like_a_scheduler,
    wait_for_http,
)

pytestmark = pytest.mark.slow


def start_head_with_jobs_api(directory):
    port, dashboard_port = free_port(), free_port()
    head = RayNode.head(
        directory / "ray-start.log", port, "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
        "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
    )  # fmt: skip
    jobs_address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_http(f"{jobs_address}/api/version")
    except AssertionError:
        head.stop()
        raise
    return head, jobs_address


@pytest.fixture(scope="module")
def jobs_address(tmp_path_factory):
    head, address = start_head_with_jobs_api(tmp_path_factory.mktemp("jobs-head"))
    try:
        yield address
    finally:
        head.stop()


def test_a_remote_run_brings_its_report_logs_and_models_back(jobs_address, tmp_path):
    output = tmp_path / "run"
    result = run_cli(
        ["submit", "--address", jobs_address, "--epochs", "40", "--save-models", "--json"], output
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["succeeded"] == 2
    report = result.report()
    assert {job["framework"]: job["status"] for job in report["jobs"]} == {
        "tensorflow": "succeeded",
        "torch": "succeeded",
    }
    assert report["cluster"]["embedded"] is False and report["cluster"]["nodes"] == 1
    assert report["driver"]["timings"]["jobs_s"] > 0
    for job in report["jobs"]:
        assert (output / "logs" / f"{job['id']}.out").read_text().startswith("runjobs: ")
        assert (output / job["model"]["path"] / "model.json").is_file()
        assert ledger_state(output, job["id"]) == "succeeded"
    # Run again into the same directory: nothing left to run, no Ray job submitted.
    again = run_cli(["submit", "--address", jobs_address, "--epochs", "40", "--save-models"], output)
    assert again.exit_code == 0 and "nothing to run" in again.stderr


def test_no_wait_then_status_and_report_fetch_the_run_later(jobs_address, tmp_path):
    submitted = run_cli(
        [
            "submit",
            "--address",
            jobs_address,
            "--framework",
            "torch",
            "--epochs",
            "30",
            "--no-wait",
            "--json",
        ],
        tmp_path / "submitted",
    )
    assert submitted.exit_code == 0, submitted.stderr
    ray_job_id = json.loads(submitted.stdout)["ray_job_id"]
    deadline = time.monotonic() + 120
    while True:
        status = run_cli(["status", "--address", jobs_address, ray_job_id, "--json"])
        assert status.exit_code == 0, status.stderr
        state = json.loads(status.stdout)
        if state["ray_job_status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        assert time.monotonic() < deadline, state
        time.sleep(1)
    assert state["ray_job_status"] == "SUCCEEDED" and state["jobs"] == 1
    assert state["counts"]["succeeded"] == 1 and state["counts"]["unfinished"] == 0

    fetched = run_cli(
        ["report", "--address", jobs_address, ray_job_id, "--output", str(tmp_path / "fetched")]
    )
    assert fetched.exit_code == 0, fetched.stderr
    (job,) = json.loads((tmp_path / "fetched" / "report.json").read_text())["jobs"]
    assert job["framework"] == "torch" and job["status"] == "succeeded"
    assert (tmp_path / "fetched" / "logs" / f"{job['id']}.out").is_file()


def test_an_unknown_ray_job_is_refused_with_the_command_that_lists_them(jobs_address):
    result = run_cli(["status", "--address", jobs_address, "raysubmit_nothing"])
    assert result.exit_code == 2
    assert "no Ray job raysubmit_nothing" in result.stderr and "ray job list" in result.stderr


def test_a_cluster_that_goes_away_mid_run_exits_3_and_keeps_what_finished(tmp_path):
    head, address = start_head_with_jobs_api(tmp_path)
    output = tmp_path / "run"
    spec = tmp_path / "sweep.yaml"
    # One short job, then long ones: the head goes away once the short one is kept here.
    spec.write_text(
        "name: lost\ndefaults: {framework: torch}\n"
        "jobs:\n  - {epochs: 20}\n  - {epochs: 400000, seed: 1}\n  - {epochs: 400000, seed: 2}\n"
    )
    driver = subprocess.Popen(
        [RUNJOBS, "submit", str(spec), "--address", address, "--output", str(output),
         "--max-concurrent", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "succeeded" not in ledger_states(output):
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the short job never finished"
            time.sleep(0.5)
        head.stop()
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        head.stop()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 3, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("runjobs: error: ") and "finished job(s) are kept" in last, stderr
    states = ledger_states(output)
    assert states.count("succeeded") == 1 and len(states) == 3, states
    report = json.loads((output / "report.json").read_text())
    assert sum(job["status"] == "succeeded" for job in report["jobs"]) == 1


def test_an_unreachable_jobs_address_exits_3_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNJOBS_CONNECT_TIMEOUT_S", "1")
    address = f"http://127.0.0.1:{free_port()}"
    result = run_cli(["submit", "--address", address], tmp_path / "run")
    assert result.exit_code == 3, result.stderr
    assert f"no Ray cluster answers at {address}" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_running_remote_run_is_not_submitted_twice_and_ray_job_stop_records_it_cancelled(
    jobs_address, tmp_path
):
    from jobs.run.ray_jobs import jobs_client
    from jobs.run.remote_protocol import STARTED_MARKER

    output = tmp_path / "run"
    args = ["submit", "--address", jobs_address, "--framework", "torch", "--epochs", "3000000"]
    submitted = run_cli([*args, "--no-wait", "--json"], output)
    assert submitted.exit_code == 0, submitted.stderr
    ray_job_id = json.loads(submitted.stdout)["ray_job_id"]
    client = jobs_client(jobs_address)
    deadline = time.monotonic() + 120
    while STARTED_MARKER not in client.get_job_logs(ray_job_id):
        assert time.monotonic() < deadline, client.get_job_logs(ray_job_id)
        time.sleep(0.5)

    again = run_cli(args, output)
    assert again.exit_code == 2
    assert f"Ray job {ray_job_id} is still running" in again.stderr and "ray job stop" in again.stderr

    client.stop_job(ray_job_id)  # SIGTERM to the remote driver, as `ray job stop` sends
    while str(client.get_job_status(ray_job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline + 60
        time.sleep(0.5)
    fetched = run_cli(["report", "--address", jobs_address, ray_job_id, "--output", str(output)])
    assert fetched.exit_code == 1, fetched.stderr
    (job,) = json.loads((output / "report.json").read_text())["jobs"]
    assert job["status"] == "cancelled" and job["error"] == "cancelled: the run was interrupted"


def test_runjobs_cancel_stops_a_remote_run_followed_from_a_background_shell(jobs_address, tmp_path):
    output = tmp_path / "run"
    args = ["submit", "--address", jobs_address, "--framework", "torch", "--epochs", "3000000"]
    with started_like_a_scheduler([*args, "--output", str(output)]) as client_process:
        deadline = time.monotonic() + 120
        while ledger_state(output, "torch") != "running":
            assert client_process.poll() is None, client_process.communicate()
            assert time.monotonic() < deadline, "the remote job never started"
            time.sleep(0.2)
        cancelled = run_cli(["cancel", str(output)])
        assert cancelled.exit_code == 0, cancelled.stderr
        assert "cancelled 1 running and 0 pending job(s)" in cancelled.stdout
        assert client_process.wait(timeout=60) == 130, client_process.stderr.read()
    (job,) = json.loads((output / "report.json").read_text())["jobs"]
    assert job["status"] == "cancelled"
