"""Sweep spec files, the ledger, re-runs and the run verbs."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from jobs.plan.spec import Overrides, SpecError
from jobs.plan.sweep import SweepSpec
from jobs.record.ledger import Ledger
from tests.helpers import (
    RUNJOBS,
    kill_actor_once_training,
    ledger_state,
    ray_is_running,
    run_cli,
    sigkill_driver_once_succeeded,
    start_cli_in_background,
    started_like_a_scheduler,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_the_shipped_examples_expand_to_their_grids():
    assert len(SweepSpec.load(EXAMPLES / "lr-seed.yaml").expand()) == 8
    assert len(SweepSpec.load(EXAMPLES / "article.yaml").expand()) == 2
    variants = SweepSpec.load(EXAMPLES / "variants.yaml").expand()
    assert sorted((spec.framework, spec.variant) for _, spec in variants) == [
        ("tensorflow", "mirrored"), ("tensorflow", "multiworker"), ("tensorflow", "single"),
        ("torch", "ddp"), ("torch", "single"),
    ]  # fmt: skip
    assert all(spec.workers == (1 if spec.variant == "single" else 2) for _, spec in variants)


def test_ids_are_stable_and_explicit_jobs_repeat_and_overrides_apply(tmp_path):
    path = write_spec(
        tmp_path,
        "name: mixed\ndefaults: {epochs: 50}\ngrid: {framework: [torch], lr: [0.01, 0.1]}\n"
        "jobs: [{framework: tensorflow, lr: 0.05, batch_size: 4}]\nrepeat: 2\n",
    )
    overrides = Overrides()
    overrides.add_assignment("epochs=7")
    first = SweepSpec.load(path).expand(overrides)
    assert [job_id for job_id, _ in first] == [job_id for job_id, _ in SweepSpec.load(path).expand(overrides)]
    assert len(first) == (2 + 1) * 2
    assert all(spec.epochs == 7 for _, spec in first), "--set wins over the spec"
    seeds = sorted((spec.framework, spec.lr, spec.seed) for _, spec in first)
    assert ("tensorflow", 0.05, 0) in seeds and ("tensorflow", 0.05, 1) in seeds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid: {learning_rate: [0.1]}\n", "unknown job field 'learning_rate'; the fields are: framework"),
        ("sweep: {}\n", "unknown key 'sweep'; the keys are name, defaults, grid, jobs, repeat"),
        ("grid: {optimizer: [rmsprop]}\n", "optimizer='rmsprop': choose one of adam, sgd"),
        ("grid: {lr: []}\n", "grid.lr must be a non-empty list"),
        ("repeat: 0\n", "repeat=0 must be a whole number >= 1"),
        ("grid: [1, 2\n", "not valid YAML"),
        ("grid: {framework: [tensorflow], variant: [ddp]}\n", "expands to no job"),
    ],
)
def test_bad_spec_files_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(SpecError) as error:
        SweepSpec.load(write_spec(tmp_path, text)).expand()
    assert message in str(error.value)


def test_dry_run_prints_the_jobs_and_starts_nothing(tmp_path):
    ray_was_running = ray_is_running()
    output = tmp_path / "run"
    result = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--dry-run", "--json"], output)
    assert result.exit_code == 0, result.stderr
    jobs = json.loads(result.stdout)
    assert len(jobs) == 8 and {job["config"]["lr"] for job in jobs} == {0.01, 0.1}
    assert not output.exists()
    assert ray_is_running() == ray_was_running
    table = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--dry-run"], output)
    assert "8 job(s); nothing started (--dry-run)" in table.stdout


def test_a_spec_file_with_framework_options_is_refused(tmp_path):
    result = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--framework", "torch"], tmp_path / "run")
    assert result.exit_code == 2
    assert "name frameworks, variants and presets in the file" in result.stderr


def test_verbs_on_a_directory_without_a_run_are_refused(tmp_path):
    for verb in (["status"], ["list"], ["report"], ["show", "--", "x"]):
        args = [verb[0], str(tmp_path), *verb[1:]] if verb[0] != "show" else ["show", str(tmp_path), "x"]
        result = run_cli(args)
        assert result.exit_code == 2
        assert "holds no runjobs ledger" in result.stderr


@pytest.mark.slow
def test_a_sweep_runs_once_and_a_resubmit_runs_nothing(ray_session, tmp_path):
    output = tmp_path / "run"
    spec = str(EXAMPLES / "lr-seed.yaml")
    first = run_cli(["submit", spec, "--set", "epochs=50", "--max-concurrent", "2", "--json"], output)
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["exit_code"] == 0 and summary["counts"]["succeeded"] == 8
    assert {"run_id", "output", "counts", "jobs", "warnings"} <= set(summary)

    again = run_cli(["submit", spec, "--set", "epochs=50", "--json"], output)
    assert again.exit_code == 0
    assert "nothing to run" in again.stderr
    with Ledger.open(output, for_writing=False) as ledger:
        assert [job.attempts for job in ledger.jobs()] == [1] * 8

    status = json.loads(run_cli(["status", str(output), "--json"]).stdout)
    assert status["counts"]["succeeded"] == 8 and status["jobs"] == 8 and status["finished"]
    rows = json.loads(run_cli(["list", str(output), "--json"]).stdout)
    assert [row["state"] for row in rows] == ["succeeded"] * 8

    forced = run_cli(
        ["submit", spec, "--set", "epochs=50", "--rerun", "all", "--max-concurrent", "4"], output
    )
    assert forced.exit_code == 0
    with Ledger.open(output, for_writing=False) as ledger:
        assert [job.attempts for job in ledger.jobs()] == [2] * 8


@pytest.mark.slow
def test_the_report_rebuilt_from_the_ledger_alone_equals_the_original(ray_session, tmp_path):
    output = tmp_path / "run"
    assert run_cli(["submit", str(EXAMPLES / "article.yaml"), "--set", "epochs=30"], output).exit_code == 0
    original = (output / "report.json").read_text()
    (output / "report.json").unlink()
    rebuilt = run_cli(["report", str(output)])
    assert rebuilt.exit_code == 0
    assert (output / "report.json").read_text() == original


@pytest.mark.slow
def test_a_second_driver_on_the_same_directory_is_refused(ray_session, tmp_path):
    output = tmp_path / "run"
    spec = str(EXAMPLES / "article.yaml")
    assert run_cli(["submit", spec, "--set", "epochs=10"], output).exit_code == 0
    with Ledger.open(output, for_writing=True):  # another driver holds the directory
        result = run_cli(["submit", spec, "--set", "epochs=20"], output)
    assert result.exit_code == 2
    assert "another runjobs driver is running on" in result.stderr


def raylet_count() -> int:
    return sum(1 for process in psutil.process_iter(["name"]) if process.info["name"] == "raylet")


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_loses_nothing_and_the_rerun_finishes_the_rest(tmp_path):
    output = tmp_path / "run"
    spec = write_spec(
        tmp_path,
        # One job a process (packing off): the kill must land between jobs.
        "name: kill\ndefaults: {epochs: 3000, packing: off}\n"
        "grid: {framework: [torch], seed: [0, 1, 2, 3, 4, 5]}\n",
    )
    command = [RUNJOBS, "submit", str(spec), "--output", str(output), "--max-concurrent", "1"]
    raylets_before = raylet_count()
    finished_before = sigkill_driver_once_succeeded(command, output, succeeded=2, limit_s=120, poll_s=0.2)
    assert len(finished_before) >= 2

    # Ray's reaper ends the killed driver's embedded Ray; wait for it before going on.
    deadline = time.monotonic() + 30
    while raylet_count() > raylets_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert raylet_count() <= raylets_before, "the killed driver's Ray was left running"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with Ledger.open(output, for_writing=False) as ledger:
        jobs = ledger.jobs()
    assert [job.status for job in jobs] == ["succeeded"] * 6
    for job in jobs:
        if job.id in finished_before:
            assert job.attempts == 1 and job.record == finished_before[job.id], "a finished job ran again"
    assert ledger_state(output, jobs[-1].id) == "succeeded"


def wait_for_state(output, job_id, wanted, limit_s=120):
    deadline = time.monotonic() + limit_s
    while ledger_state(output, job_id) not in wanted:
        assert time.monotonic() < deadline, f"{job_id} never reached {wanted}"
        time.sleep(0.1)


@pytest.mark.slow
def test_cancel_stops_a_running_sweep_and_records_its_jobs_cancelled(tmp_path):
    output = tmp_path / "run"
    spec = write_spec(
        tmp_path,
        "name: c\ndefaults: {epochs: 20000, packing: off}\ngrid: {framework: [torch], seed: [0, 1, 2]}\n",
    )
    # SIGINT ignored, as cron starts it: cancel must not depend on a signal.
    args = ["submit", str(spec), "--output", str(output), "--max-concurrent", "1", "--json"]
    with started_like_a_scheduler(args, capture_stdout=True) as driver:
        first = SweepSpec.load(spec).expand()[0][0]
        wait_for_state(output, first, ("running",))
        cancelled = run_cli(["cancel", str(output)])
        assert cancelled.exit_code == 0, cancelled.stderr
        assert "cancelled 1 running and 2 pending job(s)" in cancelled.stdout
        assert driver.wait(timeout=60) == 130, driver.stderr.read()
        # A scheduler reading --json gets the summary of a stopped run too.
        stopped = json.loads(driver.stdout.read())
        assert stopped["exit_code"] == 130 and stopped["counts"]["cancelled"] == 3
    with Ledger.open(output, for_writing=False) as ledger:
        states = [job.status for job in ledger.jobs()]
    assert states == ["cancelled"] * 3
    report = json.loads((output / "report.json").read_text())
    assert report["summary"]["cancelled"] == 3
    again = run_cli(["cancel", str(output)])
    assert again.exit_code == 2 and "no runjobs driver is running" in again.stderr
    never_started = SweepSpec.load(spec).expand()[2][0]
    logs = run_cli(["logs", str(output), never_started])
    assert logs.exit_code == 2 and "ended cancelled without kept output" in logs.stderr


def test_cancel_closes_a_run_whose_driver_died_recording_what_it_left_cancelled(tmp_path):
    from jobs.plan.spec import JobSpec
    from jobs.record.records import empty_record

    output = tmp_path / "run"
    config = JobSpec("torch").to_record()
    with Ledger.open(output, for_writing=True) as ledger:  # a driver that was killed outright
        ledger.add_jobs([("done", config), ("busy", config), ("queued", config)])
        ledger.mark("done", "failed", empty_record("done", config, "failed", "ValueError: it ended"))
        ledger.mark("busy", "running")
    closed = run_cli(["cancel", str(output), "--json"])
    assert closed.exit_code == 0, closed.stderr
    assert "recorded its 1 running and 1 pending job(s) cancelled" in closed.stderr
    summary = json.loads(closed.stdout)  # --json: stdout is the summary alone
    assert summary["exit_code"] == 130
    assert [job["status"] for job in summary["jobs"]] == ["failed", "cancelled", "cancelled"]
    assert json.loads((output / "report.json").read_text())["summary"]["cancelled"] == 2
    again = run_cli(["cancel", str(output)])
    assert again.exit_code == 2 and "nothing to cancel" in again.stderr


@pytest.mark.slow
def test_a_job_past_its_timeout_is_cancelled_and_recorded(ray_session, tmp_path):
    result = run_cli(
        ["submit", "--framework", "torch", "--epochs", "1000000", "--set", "timeout_s=3", "--json"],
        tmp_path / "run",
    )
    assert result.exit_code == 1
    job = result.report()["jobs"][0]
    assert job["status"] == "cancelled"
    assert job["error"] == "timed out after 3s (timeout_s)"
    assert 3 <= job["timings"]["total_s"] < 15


@pytest.mark.slow
def test_a_job_whose_worker_died_is_retried_when_asked(ray_session, tmp_path):
    output = tmp_path / "run"
    args = ["submit", "--framework", "torch", "--variant", "ddp", "--workers", "2", "--epochs", "15000",
            "--set", "retries=1", "--set", "setup_timeout_s=20"]  # fmt: skip
    runner, results = start_cli_in_background(args, output)
    kill_actor_once_training("runjobs:torch-ddp:rank1", settle_s=4)
    runner.join(timeout=300)
    result = results["run"]
    assert result.exit_code == 0, result.stderr
    with Ledger.open(output, for_writing=False) as ledger:
        (job,) = ledger.jobs()
    assert job.status == "succeeded" and job.attempts == 2


@pytest.mark.slow
def test_repeated_seeds_are_grouped_with_mean_and_spread(ray_session, tmp_path):
    spec = write_spec(
        tmp_path, "name: r\ndefaults: {epochs: 60, init: framework}\ngrid: {lr: [0.05]}\nrepeat: 3\n"
    )
    result = run_cli(["submit", str(spec)], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    report = result.report()
    groups = {group["framework"]: group for group in report["aggregates"]["groups"]}
    assert set(groups) == {"tensorflow", "torch"}
    for framework, group in groups.items():
        jobs = [job for job in report["jobs"] if job["framework"] == framework]
        assert sorted(group["seeds"]) == [0, 1, 2]
        weights = [job["params"]["weights"][0] for job in jobs]
        assert group["weights"][0]["mean"] == pytest.approx(sum(weights) / 3)
        assert group["weights"][0]["std"] == pytest.approx(statistics.stdev(weights))
        assert sum(group["convergence"].values()) == 3
    (pair,) = report["aggregates"]["pairs"]
    assert pair["train_time_ratio"] == pytest.approx(
        groups["tensorflow"]["train_s"]["mean"] / groups["torch"]["train_s"]["mean"]
    )
    assert "seeds grouped" in result.stdout


@pytest.mark.slow
def test_of_two_drivers_on_a_new_directory_the_second_is_refused_before_it_starts_ray(tmp_path):
    output = tmp_path / "run"
    args = ["submit", "--framework", "torch", "--epochs", "2000000", "--output", str(output)]
    with started_like_a_scheduler(args) as first:
        # The first driver holds the directory's lock from before it connects.
        assert wait_until_exists(output / "ledger.lock", first)
        ray_was_running = ray_is_running()
        second = run_cli(["submit", "--framework", "torch", "--output", str(output)])
        assert second.exit_code == 2 and "another runjobs driver is running" in second.stderr
        assert "job(s) to run" not in second.stderr and ray_is_running() == ray_was_running
        assert run_cli(["cancel", str(output)]).exit_code == 0
        assert first.wait(timeout=60) == 130


def wait_until_exists(path, process, limit_s: float = 60) -> bool:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- random search ----------------------------------------------------------------------

RANDOM = """name: random
defaults: {{epochs: 30}}
grid: {{framework: [torch, tensorflow]}}
sample:
  lr: {{loguniform: [0.001, 0.1]}}
  beta_1: {{uniform: [0.8, 0.95]}}
  seed: {{randint: [0, 3]}}
  optimizer: {{choice: [adam, sgd]}}
samples: {samples}
sample_seed: 7
"""


def test_random_search_draws_the_same_configs_every_time_and_more_samples_keep_the_first(tmp_path):
    first = SweepSpec.load(write_spec(tmp_path, RANDOM.format(samples=3))).expand()
    again = SweepSpec.load(write_spec(tmp_path, RANDOM.format(samples=3))).expand()
    assert [job_id for job_id, _ in first] == [job_id for job_id, _ in again]
    more = SweepSpec.load(write_spec(tmp_path, RANDOM.format(samples=5))).expand()
    assert {job_id for job_id, _ in first} < {job_id for job_id, _ in more}, "raising samples keeps the draws"
    specs = [spec for _, spec in more]
    assert len(specs) == 10 and {spec.framework for spec in specs} == {"torch", "tensorflow"}
    for spec in specs:
        assert 0.001 <= spec.lr <= 0.1 and 0.8 <= spec.beta_1 <= 0.95
        assert spec.seed in (0, 1, 2, 3) and spec.optimizer in ("adam", "sgd")
    # Each draw pairs with every grid point: both frameworks train the same sampled configs.
    by_framework = {
        framework: [(spec.lr, spec.beta_1, spec.seed) for spec in specs if spec.framework == framework]
        for framework in ("torch", "tensorflow")
    }
    assert by_framework["torch"] == by_framework["tensorflow"]


@pytest.mark.parametrize(
    "body, expected",
    [
        ("sample: {lr: {normal: [0, 1]}}\nsamples: 2", "unknown distribution 'normal'"),
        (
            "sample: {lr: {uniform: [0.1, 0.01]}}\nsamples: 2",
            "uniform takes finite numbers [low, high] with low < high",
        ),
        ("sample: {lr: {loguniform: [0, 0.1]}}\nsamples: 2", "loguniform takes low > 0"),
        ("sample: {seed: {randint: [0, 1.5]}}\nsamples: 2", "randint takes whole numbers"),
        ("sample: {optimizer: {choice: []}}\nsamples: 2", "choice takes a non-empty list"),
        ("sample: {lr: 0.1}\nsamples: 2", "give one of {loguniform: ...}"),
        ("sample: {lrr: {uniform: [0.1, 0.2]}}\nsamples: 2", "unknown job field 'lrr'"),
        ("sample: {lr: {uniform: [0.1, 0.2]}}", "samples=None: give how many configs to draw"),
        ("samples: 3", "samples and sample_seed go with sample:"),
        (
            "grid: {lr: [0.1]}\nsample: {lr: {uniform: [0.1, 0.2]}}\nsamples: 2",
            "lr is both in grid and in sample",
        ),
        ("sample: {lr: {uniform: [0.1, 0.2]}}\nsamples: 200001", "expands to 400002 jobs"),
        (
            "sample: {seed: {randint: [0, 9]}}\nsamples: 2\nsample_seed: -1",
            "sample_seed=-1 must be a whole number",
        ),
    ],
)
def test_a_bad_sample_is_refused_in_one_line_before_anything_starts(tmp_path, body, expected):
    spec = write_spec(tmp_path, f"name: bad\n{body}\n")
    result = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_random_search_resumes_a_rerun_runs_nothing_and_more_samples_run_only_the_new(
    ray_session, tmp_path
):
    output = tmp_path / "run"
    first = run_cli(["submit", str(write_spec(tmp_path, RANDOM.format(samples=2))), "--json"], output)
    assert first.exit_code in (0, 1), first.stderr  # an sgd draw may diverge: still a result
    assert len(first.report()["jobs"]) == 4
    again = run_cli(["submit", str(write_spec(tmp_path, RANDOM.format(samples=2)))], output)
    assert "nothing to run" in again.stderr
    more = run_cli(["submit", str(write_spec(tmp_path, RANDOM.format(samples=3))), "--json"], output)
    assert len(more.report()["jobs"]) == 6
    with Ledger.open(output, for_writing=False) as ledger:
        assert all(job.attempts == 1 for job in ledger.jobs()), "no draw ran twice"
