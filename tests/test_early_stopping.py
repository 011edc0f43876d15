"""Early stopping from the control plane: the rules, the spec, and stopped jobs kept as their own status.

The rules are driven with reports directly (no Ray, no framework); the runs train real
torch jobs, in this process (the in-process executor judges each report at once, so
what it stops is exact) and on Ray (the driver reads the jobs' reports from the run's
board actor while they train).
"""

from __future__ import annotations

import json
import math
import time

import pytest

from jobs.pipeline import submit
from jobs.plan.planning import SubmitRequest
from jobs.plan.stopping_rule import StoppingRule
from jobs.record.ledger import Ledger
from jobs.record.status import run_status
from jobs.run.in_process import InProcessExecutor
from jobs.run.progress import LineProgress
from jobs.run.stopping import StoppingPolicy
from tests.helpers import load_strict_json, run_cli, start_cli_in_background


class Quiet(LineProgress):
    def say(self, message: str) -> None:
        pass


def curve(start: float, rate: float, epochs: int) -> list[float]:
    return [start * math.exp(-rate * epoch) for epoch in range(1, epochs + 1)]


# The rules.


def test_the_median_rule_stops_a_job_clearly_behind_once_enough_others_got_as_far():
    policy = StoppingPolicy(StoppingRule("median", every=10, grace=20, min_jobs=2))
    policy.ended("good-1", curve(100, 0.1, 100))
    # One finished job is not enough company: nothing is stopped yet.
    assert policy.observe("slow", 20, 90.0) is None
    policy.ended("good-2", curve(100, 0.08, 100))
    assert policy.observe("fine", 20, 10.0) is None  # ahead of the others: goes on
    # Before the grace epochs nothing is judged, however bad.
    assert policy.observe("slow", 10, 1e9) is None
    reason = policy.observe("slow", 30, 80.0)
    assert reason is not None and "median rule" in reason and "epoch 30" in reason


def test_the_median_rule_compares_only_jobs_that_got_as_far_and_counts_nan_as_worst():
    policy = StoppingPolicy(StoppingRule("median", every=10, grace=0, min_jobs=1))
    policy.ended("short", curve(100, 0.1, 20))
    assert policy.observe("long", 50, 1e6) is None  # nobody else reached epoch 50
    assert policy.observe("diverged", 20, float("nan")) is not None


def test_successive_halving_keeps_the_best_third_at_each_rung():
    policy = StoppingPolicy(StoppingRule("halving", every=10, grace=10, reduction=3))
    assert StoppingRule("halving", every=10, grace=10, reduction=3).rungs_up_to(100) == [10, 30, 90]
    assert policy.observe("a", 10, 5.0) is None
    assert policy.observe("b", 10, 1.0) is None  # two at the rung: too few to judge
    reason = policy.observe("c", 10, 3.0)  # three there: only the best third (b) goes on
    assert reason is not None and "successive halving" in reason and "epoch 10" in reason
    assert policy.observe("d", 10, 0.5) is None  # the new best
    assert policy.observe("b", 20, 0.9) is None  # between rungs nothing is judged


def test_a_failed_jobs_reports_are_forgotten_so_its_retry_is_judged_afresh():
    policy = StoppingPolicy(StoppingRule("halving", every=10, grace=10, reduction=2))
    assert policy.observe("a", 10, 1.0) is None
    assert policy.observe("b", 10, 5.0) is not None  # behind at the first rung
    policy.forget("b")  # its worker died; the job is retried
    assert policy.observe("b", 10, 0.5) is None  # judged on the retry's own loss


@pytest.mark.parametrize(
    "stopping, message",
    [
        ("{rule: asha}", "stopping.rule='asha'"),
        ("{rule: median, every: 0}", "stopping.every=0"),
        ("{rule: halving, reduction: 1}", "stopping.reduction=1"),
        ("{rule: median, patience: 3}", "unknown stopping key 'patience'"),
        ("median", "stopping is a mapping"),
        ("{rule: halving, every: 20, grace: 50}", "multiple of stopping.every"),
    ],
)
def test_a_stopping_rule_that_cannot_work_is_refused_before_anything_starts(tmp_path, stopping, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"grid: {{framework: [torch]}}\nstopping: {stopping}\n")
    result = run_cli(["submit", str(spec), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


# Real runs.


def write_sweep(tmp_path, epochs=200, rates="[0.1, 0.08, 0.06, 0.0002]", stopping="", name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(
        f"defaults: {{framework: torch, epochs: {epochs}}}\n"
        f"grid: {{lr: {rates}}}\n"
        f"stopping: {stopping or '{rule: median, every: 10, grace: 50, min_jobs: 2}'}\n"
    )
    return path


@pytest.mark.slow
def test_a_job_clearly_behind_is_stopped_with_its_partial_history_and_the_run_exits_0(tmp_path):
    output = tmp_path / "out"
    outcome = submit(
        SubmitRequest(spec_file=write_sweep(tmp_path), output=output), Quiet(), executor=InProcessExecutor()
    )
    assert outcome.exit_code == 0
    report = load_strict_json(output / "report.json")
    by_lr = {job["config"]["lr"]: job for job in report["jobs"]}
    assert [by_lr[lr]["status"] for lr in (0.1, 0.08, 0.06)] == ["succeeded"] * 3
    slow = by_lr[0.0002]
    assert slow["status"] == "stopped" and slow["error"] is None
    # Judged at its first report from the grace epochs on, with two finished jobs beside it.
    assert slow["stopped"]["epochs"] == 50 and slow["stopped"]["of"] == 200
    assert "median rule" in slow["stopped"]["reason"] and slow["stopped"]["rule"]["rule"] == "median"
    assert len(slow["loss"]["history"]) == 50 and len(slow["history"]["epoch_s"]) == 50
    # Its final loss is that of the parameters it stopped with: between its start and the others'.
    assert by_lr[0.1]["loss"]["final"] < slow["loss"]["final"] < slow["loss"]["history"][0]
    assert report["summary"]["stopped"] == 1 and report["summary"]["succeeded"] == 3
    with Ledger.open(output, for_writing=False) as ledger:
        assert ledger.counts()["stopped"] == 1
    # A stopped job has its result: a re-run runs nothing.
    again = submit(
        SubmitRequest(spec_file=write_sweep(tmp_path), output=output), Quiet(), executor=InProcessExecutor()
    )
    assert again.ran == 0 and again.exit_code == 0
    table = run_cli(["report", str(output)])
    assert "stopped at 50" in table.stdout


@pytest.mark.slow
def test_a_search_tells_optuna_its_stopped_trials_as_pruned(tmp_path):
    optuna = pytest.importorskip("optuna")
    spec = tmp_path / "search.yaml"
    spec.write_text(
        "defaults: {framework: torch, epochs: 100}\n"
        "sample: {lr: {choice: [0.1, 0.0001]}}\n"
        "search: {trials: 6, metric: loss.final}\n"
        "stopping: {rule: median, every: 10, grace: 20, min_jobs: 1}\n"
    )
    output = tmp_path / "out"
    outcome = submit(SubmitRequest(spec_file=spec, output=output), Quiet(), executor=InProcessExecutor())
    assert outcome.exit_code == 0
    storage = f"sqlite:///{output / 'study.sqlite'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    jobs = {job["id"].rsplit("trial", 1)[1]: job for job in load_strict_json(output / "report.json")["jobs"]}
    states = {(jobs[str(trial.number)]["status"], trial.state.name) for trial in trials}
    assert ("stopped", "PRUNED") in states, states
    assert states <= {("stopped", "PRUNED"), ("succeeded", "COMPLETE")}


@pytest.mark.slow
def test_on_ray_the_driver_stops_a_running_job_from_its_reports_shown_by_status(tmp_path, ray_session):
    # Three short good jobs first (one at a time), then a long bad one: it reports every
    # 100 epochs and is stopped by the driver while it trains, long before its end.
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "defaults: {framework: torch, epochs: 2000}\n"
        "grid: {lr: [0.1, 0.08, 0.06]}\n"
        "jobs: [{lr: 0.0001, epochs: 200000}]\n"
        "stopping: {rule: median, every: 100, grace: 200, min_jobs: 2}\n"
    )
    output = tmp_path / "out"
    runner, results = start_cli_in_background(
        ["submit", str(spec), "--max-concurrent", "1", "--json"], output
    )
    seen = []  # `runjobs status` while the jobs run: their latest epoch and loss
    while runner.is_alive():
        if (output / "ledger.sqlite").exists():
            state = run_status(output)  # what `runjobs status` prints (CliRunner is busy on the thread)
            seen += [report for job, report in state["progress"].items() if job in state["running"]]
        time.sleep(0.05)
    runner.join()
    result = results["run"]
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 0
    assert seen and all(epoch % 100 == 0 and loss > 0 for epoch, loss in seen), seen
    report = load_strict_json(output / "report.json")
    (slow,) = [job for job in report["jobs"] if job["config"]["lr"] == 0.0001]
    assert slow["status"] == "stopped" and 200 <= slow["stopped"]["epochs"] < 200000
    assert len(slow["loss"]["history"]) == slow["stopped"]["epochs"]
    assert json.loads(run_cli(["status", str(output), "--json"]).stdout)["progress"] == {}


def test_a_thinned_history_joins_the_comparison_at_the_epochs_it_holds():
    """A record past 100 epochs keeps only some epochs (history_epochs): each loss at its own epoch."""
    policy = StoppingPolicy(StoppingRule("median", every=10, grace=20, min_jobs=2))
    policy.ended("thinned", [9.0, 5.0, 4.0, 3.0], [1, 10, 25, 30])
    assert policy.losses["thinned"] == {10: 5.0, 30: 3.0}
    policy.ended("none of its epochs", [9.0, 8.0], [1, 7])
    assert "none of its epochs" not in policy.losses
