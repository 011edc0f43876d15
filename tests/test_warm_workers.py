"""Warm workers: each process keeps one framework and runs many jobs; a dead one is replaced."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from jobs.record.ledger import Ledger
from tests.helpers import run_cli, start_cli_in_background

pytestmark = pytest.mark.slow


def write_spec(directory, text):
    path = directory / "sweep.yaml"
    path.write_text(text)
    return path


def test_a_sweep_reuses_one_process_per_framework_and_never_mixes_them(ray_session, tmp_path):
    spec = write_spec(
        tmp_path, "name: warm\ndefaults: {epochs: 20, packing: off}\ngrid: {lr: [0.01, 0.02, 0.03, 0.04]}\n"
    )
    result = run_cli(["submit", str(spec)], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    jobs = result.report()["jobs"]
    processes = defaultdict(list)  # framework -> the pid of each of its jobs, in the order they ran
    for job in sorted(jobs, key=lambda job: job["timings"]["total_s"]):
        processes[job["framework"]].append(job["placement"]["pid"])
    assert len(jobs) == 8
    assert not set(processes["tensorflow"]) & set(processes["torch"]), "a worker ran both frameworks"
    for framework, pids in processes.items():
        assert len(set(pids)) < len(pids), f"every {framework} job had a process of its own: {pids}"
    # A reused worker's later jobs pay no import: start-up is the first job's alone.
    by_process = defaultdict(list)
    for job in jobs:
        by_process[job["placement"]["pid"]].append(job["timings"]["startup_s"])
    for startups in by_process.values():
        if len(startups) > 1:
            startups.sort(reverse=True)
            assert all(later < 0.5 * startups[0] for later in startups[1:]), startups


def test_a_warm_worker_that_dies_is_replaced_and_its_job_retried(ray_session, tmp_path):
    import ray

    spec = write_spec(
        tmp_path,
        "name: die\ndefaults: {framework: torch, epochs: 20000, retries: 1, packing: off}\n"
        "grid: {seed: [0, 1, 2]}\n",
    )
    output = tmp_path / "run"
    runner, results = start_cli_in_background(["submit", str(spec), "--max-concurrent", "1"], output)
    deadline = time.monotonic() + 120

    def warm_torch_workers():
        return [name for name in ray.util.list_named_actors() if name.startswith("runjobs:warm:torch")]

    while not (names := warm_torch_workers()):
        assert time.monotonic() < deadline, "no warm torch worker started"
        time.sleep(0.2)
    time.sleep(4)  # past the import, into the first job's training
    ray.kill(ray.get_actor(names[0]), no_restart=True)
    runner.join(timeout=300)
    result = results["run"]
    assert result.exit_code == 0, result.stderr
    with Ledger.open(output, for_writing=False) as ledger:
        jobs = ledger.jobs()
    assert [job.status for job in jobs] == ["succeeded"] * 3
    assert sorted(job.attempts for job in jobs) == [1, 1, 2]
    pids = {job["placement"]["pid"] for job in result.report()["jobs"]}
    assert len(pids) >= 1 and not any(name in ray.util.list_named_actors() for name in names)
