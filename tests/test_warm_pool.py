"""Warm workers that outlive a submit, on a `ray start` head this module starts and ends.

Each test submits through the CLI, as a user iterating against a running cluster would,
and reads which processes ran the jobs (each record's placement.pid) and what the pool
says of itself (`runjobs pool status --json`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import RUNJOBS, load_strict_json, running_head, sigkill_driver_once_succeeded

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A two-CPU `ray start --head` of this module's own; ended by terminating its process."""
    arguments = ("--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false")
    with running_head(tmp_path_factory.mktemp("pool-head"), *arguments) as address:
        yield address


@pytest.fixture
def empty_pool(head):
    """Every test starts and ends with no kept worker on the head."""
    pool(head, "stop")
    yield head
    pool(head, "stop")


def submit(address: str, output: Path, *args: str, runjobs: list[str] | None = None, cwd=None):
    command = [
        *(runjobs or [RUNJOBS]),
        "submit",
        "--address",
        address,
        "--output",
        str(output),
        "--json",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return load_strict_json(output / "report.json")


def pool(address: str, action: str) -> list | dict:
    result = subprocess.run(
        [RUNJOBS, "pool", action, "--address", address, "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pids(report: dict) -> dict[str, int]:
    return {job["id"]: job["placement"]["pid"] for job in report["jobs"]}


def wait_until(condition, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_a_second_submit_reuses_the_first_ones_workers_and_gives_the_same_results(empty_pool, tmp_path):
    first = submit(empty_pool, tmp_path / "first", "--epochs", "100")
    kept = pool(empty_pool, "status")
    assert sorted(row["kind"] for row in kept) == ["tensorflow", "torch"]
    assert all(row["state"] == "idle" and row["current_code"] for row in kept)
    assert all(540 < row["ends_in_s"] <= 600 for row in kept), "CPU workers stay 10 minutes by default"

    second = submit(empty_pool, tmp_path / "second", "--epochs", "100")
    assert pids(second) == pids(first), "the second submit ran on the first one's processes"
    for job in second["jobs"]:
        assert job["timings"]["startup_s"] < 0.5, job["timings"]
        assert job["placement"]["worker"]["process"] == "warm"
        assert job["placement"]["worker"]["jobs_before"] == 1
    parameters = {job["id"]: job["params"] for job in first["jobs"]}
    assert {job["id"]: job["params"] for job in second["jobs"]} == parameters

    ended = pool(empty_pool, "stop")
    assert ended == {"ended": 2, "ending_after_their_run": 0}
    assert pool(empty_pool, "status") == []


def test_keep_warm_zero_ends_the_workers_with_the_run(empty_pool, tmp_path):
    submit(empty_pool, tmp_path / "run", "--epochs", "20", "--keep-warm", "0")
    assert pool(empty_pool, "status") == []


def test_the_idle_time_ends_the_workers(empty_pool, tmp_path):
    submit(empty_pool, tmp_path / "run", "--epochs", "20", "--framework", "torch", "--keep-warm", "2s")
    assert [row["kind"] for row in pool(empty_pool, "status")] == ["torch"]
    assert wait_until(lambda: pool(empty_pool, "status") == [], 30), "an idle worker ended itself"


def test_a_submit_of_changed_code_does_not_reuse_the_workers(empty_pool, tmp_path):
    first = submit(empty_pool, tmp_path / "first", "--epochs", "20", "--framework", "torch")
    [first_code] = {row["code"] for row in pool(empty_pool, "status")}
    # Another checkout: the same code with one comment more.
    checkout = tmp_path / "checkout"
    for package in ("jobs", "workers"):
        shutil.copytree(
            REPOSITORY / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    entry = checkout / "workers" / "entry.py"
    entry.write_text(entry.read_text() + "\n# a change\n")
    changed = [sys.executable, "-c", "from jobs.cli import main; main()"]
    environment_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(checkout)
    try:
        second = submit(
            empty_pool,
            tmp_path / "second",
            "--epochs",
            "20",
            "--framework",
            "torch",
            runjobs=changed,
            cwd=checkout,
        )
    finally:
        if environment_before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = environment_before
    assert set(pids(second).values()).isdisjoint(pids(first).values()), "changed code ran in a new process"
    codes = {row["code"] for row in pool(empty_pool, "status")}
    assert codes - {first_code}, f"the changed checkout keeps workers of its own code version: {codes}"


def test_a_job_waiting_for_cpus_gets_those_an_idle_kept_worker_held(empty_pool, tmp_path):
    submit(empty_pool, tmp_path / "warm", "--epochs", "20")
    assert len(pool(empty_pool, "status")) == 2, "both CPUs of the head are held by idle kept workers"
    # A two-worker ddp job needs both CPUs at once.
    report = submit(
        empty_pool,
        tmp_path / "ddp",
        "--epochs",
        "20",
        "--framework",
        "torch",
        "--variant",
        "ddp",
        "--workers",
        "2",
    )
    assert [job["status"] for job in report["jobs"]] == ["succeeded"]


def test_a_killed_drivers_workers_are_free_again_once_its_lease_runs_out(empty_pool, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "defaults: {epochs: 300, framework: torch, packing: off}\ngrid: {seed: [0, 1, 2, 3, 4, 5, 6, 7]}\n"
    )
    output = tmp_path / "run"
    command = [RUNJOBS, "submit", str(spec), "--address", empty_pool, "--output", str(output)]
    before = sigkill_driver_once_succeeded(command, output, succeeded=2, limit_s=180)
    held = pool(empty_pool, "status")
    assert held and all(row["state"] in ("busy", "leased") for row in held), (
        "the dead driver still holds them"
    )
    assert wait_until(lambda: all(row["state"] == "idle" for row in pool(empty_pool, "status")), 60), (
        "a lease nobody renews runs out"
    )
    report = submit(empty_pool, output, str(spec), "--keep-warm", "0")
    rerun = [job for job in report["jobs"] if job["id"] not in before]
    assert {job["placement"]["pid"] for job in rerun} <= {row["pid"] for row in held}, (
        "the re-run reused them"
    )
    assert all(job["status"] == "succeeded" for job in report["jobs"])
    assert pool(empty_pool, "status") == [], "--keep-warm 0 ended them with the run"
