"""Adaptive search with Optuna: trials asked as the run goes, a study in step with the ledger.

The quick tests check the spec's refusals and --dry-run; the rest run real searches:
in this process (the in-process executor, real torch) for determinism, failures and
the states a killed driver leaves behind, and through `runjobs submit` on an embedded
Ray for a driver SIGKILLed mid-search and run again.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from jobs.pipeline import submit
from jobs.plan.optuna_search import STUDY_FILE, Study, trial_number
from jobs.plan.planning import SubmitRequest, TrialPlanner, search_of
from jobs.plan.spec import Overrides
from jobs.record.ledger import Ledger
from jobs.record.store import keep_record
from jobs.run.cluster import ResourceRequestError
from jobs.run.driver import merge_worker_results, planned_outcome
from jobs.run.in_process import InProcessExecutor
from jobs.run.progress import LineProgress
from tests.helpers import RUNJOBS, load_strict_json, run_cli, sigkill_driver_once_succeeded
from workers.entry import run_job

optuna = pytest.importorskip("optuna")


class Quiet(LineProgress):
    def say(self, message: str) -> None:
        pass


def write_search(tmp_path, trials=4, parallel=1, extra="", sample=None, name="search.yaml"):
    sample = sample or "  lr: {loguniform: [0.001, 0.3]}\n  seed: {randint: [0, 1000]}\n"
    path = tmp_path / name
    path.write_text(
        "name: lr-search\n"
        "defaults: {framework: torch, epochs: 30}\n"
        f"sample:\n{sample}"
        f"search: {{algorithm: optuna, metric: loss.final, direction: minimize, trials: {trials}, "
        f"parallel: {parallel}}}\n" + extra
    )
    return path


def run_search(spec, output):
    request = SubmitRequest(spec_file=spec, output=output)
    return submit(request, Quiet(), executor=InProcessExecutor())


def study_trials(output):
    storage = f"sqlite:///{output / STUDY_FILE}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return study, study.get_trials(deepcopy=False)


# Refused before anything starts.


@pytest.mark.parametrize(
    "document, message",
    [
        ("defaults: {framework: torch}\nsearch: {trials: 4}\n", "search: needs sample:"),
        (
            "grid: {lr: [0.1]}\nsample: {seed: {randint: [0, 9]}}\nsearch: {trials: 4}\n",
            "not grid:, jobs:, repeat: or samples:",
        ),
        ("sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 0}\n", "search.trials=0"),
        (
            "sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, direction: up}\n",
            "search.direction='up'",
        ),
        (
            "sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, metric: final}\n",
            "search.metric='final'",
        ),
        ("sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, algorithm: asha}\n", "algorithm='asha'"),
        (
            "sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, budget: 9}\n",
            "unknown search key 'budget'",
        ),
        ("sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3}\n", "name its framework"),
        ("sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, metric: loss.finl}\n", "loss.finl"),
        (
            "sample: {lr: {uniform: [0.01, 0.1]}}\nsearch: {trials: 3, parallel: 5000}\n",
            "search.parallel=5000",
        ),
        (
            "defaults: {framework: torch}\nsample: {model_args: {choice: [{1: a, b: c}]}}\n"
            "search: {trials: 3}\n",
            "text keys",
        ),
        (
            "defaults: {framework: torch}\nsample: {epochs: {randint: [0, 5]}}\nsearch: {trials: 3}\n",
            "epochs",
        ),
    ],
)
def test_a_search_that_cannot_run_is_refused_in_one_line_before_anything_starts(tmp_path, document, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(document)
    output = tmp_path / "out"
    result = run_cli(["submit", str(spec), "--output", str(output)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not output.exists()


def test_dry_run_shows_the_search_its_space_and_what_stays_fixed(tmp_path):
    spec = write_search(tmp_path, trials=12, parallel=2)
    result = run_cli(["submit", str(spec), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "optuna, 12 trial(s), 2 at a time, minimize loss.final" in result.stdout
    assert 'lr: {"loguniform": [0.001, 0.3]}' in result.stdout and '"epochs": 30' in result.stdout
    as_json = json.loads(run_cli(["submit", str(spec), "--dry-run", "--json"]).stdout)
    assert as_json["search"]["trials"] == 12 and as_json["sample"]["seed"] == {"randint": [0, 1000]}


def test_a_search_refuses_options_that_would_silently_not_apply(tmp_path):
    spec = write_search(tmp_path)
    output = ["--output", str(tmp_path / "out")]
    framework = run_cli(["submit", str(spec), "--framework", "jax", *output])
    assert framework.exit_code == 2 and "not as options" in framework.stderr
    swept = run_cli(["submit", str(spec), "--set", "lr=0.1", *output])
    assert swept.exit_code == 2 and "the search samples lr" in swept.stderr
    assert not (tmp_path / "out").exists()


def test_a_choice_mixing_plain_values_and_lists_comes_back_as_drawn():
    from jobs.plan.optuna_search import decoded, optuna_distribution
    from jobs.plan.sampling import Distribution

    hidden = Distribution("choice", (32, [64, 64]))
    stored = optuna_distribution(hidden).choices
    assert [decoded(hidden, value) for value in stored] == [32, [64, 64]]
    plain = Distribution("choice", ("tensorflow", "torch"))
    assert [decoded(plain, value) for value in optuna_distribution(plain).choices] == ["tensorflow", "torch"]


def test_a_search_refuses_rerun_no_wait_and_files_the_head_cannot_see(tmp_path):
    spec = write_search(tmp_path)
    rerun = run_cli(["submit", str(spec), "--rerun", "failed", "--output", str(tmp_path / "a")])
    assert rerun.exit_code == 2 and "new --output directory" in rerun.stderr
    address = ["--address", "http://127.0.0.1:8265", "--output", str(tmp_path / "b")]
    no_wait = run_cli(["submit", str(spec), *address, "--no-wait"])
    assert no_wait.exit_code == 2 and "without --no-wait" in no_wait.stderr
    csv = tmp_path / "houses.csv"
    csv.write_text("size,price\n1,2\n2,4\n3,6\n")
    remote_csv = write_search(tmp_path, extra="", name="csv.yaml")
    remote_csv.write_text(remote_csv.read_text().replace("epochs: 30", f"epochs: 30, data: {csv}"))
    refused = run_cli(["submit", str(remote_csv), *address])
    assert refused.exit_code == 2 and "--address HEAD:6379" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_a_search_space_the_cluster_cannot_hold_is_refused_before_any_trial(tmp_path):
    spec = write_search(tmp_path)
    spec.write_text(spec.read_text().replace("epochs: 30", "epochs: 30, gpus_per_job: 1"))
    output = tmp_path / "out"
    with pytest.raises(ResourceRequestError, match="single-device CPU jobs only"):
        run_search(spec, output)
    assert not output.exists()


# Real searches in this process.


@pytest.mark.slow
def test_the_same_spec_and_seed_gives_the_same_trials_and_the_report_names_the_studys_best(tmp_path):
    spec = write_search(tmp_path, trials=5)
    first = run_search(spec, tmp_path / "first")
    second = run_search(spec, tmp_path / "second")
    assert first.exit_code == 0 and second.exit_code == 0 and first.ran == 5

    def trials(output):
        return [(trial.number, trial.params, trial.value) for trial in study_trials(output)[1]]

    assert trials(tmp_path / "first") == trials(tmp_path / "second")
    study, finished = study_trials(tmp_path / "first")
    assert len(finished) == 5 and all(trial.state.name == "COMPLETE" for trial in finished)
    report = load_strict_json(tmp_path / "first" / "report.json")
    assert sorted(trial_number(job["id"]) for job in report["jobs"]) == [0, 1, 2, 3, 4]
    best = report["search"]["best"]
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert best["fields"] == {"lr": study.best_params["lr"], "seed": study.best_params["seed"]}
    # Each trial's job trained the values the study gave it.
    for job in report["jobs"]:
        params = finished[trial_number(job["id"])].params
        assert job["config"]["lr"] == params["lr"] and job["config"]["seed"] == params["seed"]

    # Done: a re-run needs nothing; raising trials continues the study with new draws.
    again = run_search(spec, tmp_path / "first")
    assert again.ran == 0
    more = run_search(write_search(tmp_path, trials=7), tmp_path / "first")
    assert more.ran == 2
    _, continued = study_trials(tmp_path / "first")
    assert len(continued) == 7
    drawn = [tuple(sorted(trial.params.items())) for trial in continued]
    assert len(set(drawn)) == 7, "a continued study repeated an earlier trial's values"


@pytest.mark.slow
def test_a_failed_trial_is_told_failed_and_two_equal_draws_stay_two_jobs(tmp_path):
    model = tmp_path / "fragile.py"
    model.write_text(
        "def build_torch(features, config):\n"
        "    import torch\n"
        "    if config['model_args'].get('explode'):\n"
        "        raise RuntimeError('this model refuses to build')\n"
        "    layers = [torch.nn.Linear(features, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)]\n"
        "    return torch.nn.Sequential(*layers)\n"
    )
    spec = tmp_path / "fragile.yaml"
    spec.write_text(
        f"defaults: {{framework: torch, epochs: 10, model: {model}}}\n"
        "sample: {model_args: {choice: [{explode: true}, {explode: false}]}}\n"
        "search: {trials: 6, metric: loss.final}\n"
    )
    outcome = run_search(spec, tmp_path / "out")
    assert outcome.exit_code == 1  # some trials' jobs failed
    _, trials = study_trials(tmp_path / "out")
    report = load_strict_json(tmp_path / "out" / "report.json")
    jobs = {trial_number(job["id"]): job for job in report["jobs"]}
    assert len(trials) == 6 and len(jobs) == 6
    for trial in trials:
        exploded = json.loads(trial.params["model_args"])["explode"]
        assert jobs[trial.number]["status"] == ("failed" if exploded else "succeeded")
        assert trial.state.name == ("FAIL" if exploded else "COMPLETE")
        assert jobs[trial.number]["config"]["model_args"] == {"explode": exploded}
    # Only two values exist, so trials repeat them; each is its own job all the same.
    assert len({job["id"] for job in jobs.values()}) == 6


@pytest.mark.slow
def test_a_rerun_tells_what_the_ledger_kept_and_runs_what_it_did_not(tmp_path):
    """The two moments a killed driver can leave the study and the ledger apart, made for real."""
    spec = write_search(tmp_path, trials=4)
    output = tmp_path / "out"
    run_search(write_search(tmp_path, trials=1), output)  # trial 0 done and told
    search = search_of(SubmitRequest(spec_file=spec))
    planner = TrialPlanner(search, Overrides())
    study = Study(search, output, Overrides().to_record()).open()
    # Killed after asking: trial 1 is running in the study, its job nowhere else.
    asked = study.ask()
    assert asked.number == 1
    # Killed while Optuna wrote a trial's values one by one: trial 2 has its lr, not its seed.
    from optuna.distributions import FloatDistribution

    half_written = study.study.ask({"lr": FloatDistribution(0.001, 0.3, log=True)})
    # Killed after keeping: trial 3's job has its record in the ledger, the study never heard.
    kept = study.ask()
    kept_job = planner.job(study.fields_of(kept), kept.number)
    result = merge_worker_results([run_job(kept_job.spec.for_worker(), kept_job.dataset, time.time())])
    kept_outcome = planned_outcome(kept_job, "succeeded", None, result)
    with Ledger.open(output, for_writing=True) as ledger:
        ledger.add_jobs([(kept_job.id, kept_job.spec.to_record())])
        ledger.mark(kept_job.id, "running")
        keep_record(output, ledger, kept_outcome)
    study.close()

    outcome = run_search(spec, output)
    # Trials 1 and 2 run (2 with the rest of its values drawn now); trial 3 was told from the
    # ledger, not run again.
    assert outcome.ran == 2
    _, trials = study_trials(output)
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * 4
    assert half_written.number == 2 and trials[2].params["lr"] == half_written.params["lr"]
    assert set(trials[2].params) == {"lr", "seed"}
    assert trials[kept.number].value == kept_outcome.record["loss"]["final"]
    with Ledger.open(output, for_writing=False) as ledger:
        rows = {row.id: row for row in ledger.jobs()}
    assert len(rows) == 4 and rows[kept_job.id].attempts == 1
    assert {trial_number(job_id) for job_id in rows} == {0, 1, 2, 3}


# A driver killed mid-search, for real.


@pytest.mark.slow
def test_a_search_whose_driver_is_killed_continues_with_no_trial_lost_or_run_twice(tmp_path):
    spec = write_search(tmp_path, trials=12, parallel=2)
    output = tmp_path / "run"
    command = [RUNJOBS, "submit", str(spec), "--output", str(output)]
    finished_before = sigkill_driver_once_succeeded(command, output, succeeded=4, limit_s=180)
    assert 4 <= len(finished_before) < 12

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    study, trials = study_trials(output)
    with Ledger.open(output, for_writing=False) as ledger:
        jobs = ledger.jobs()
    assert len(trials) == 12 and all(trial.state.name == "COMPLETE" for trial in trials)
    assert len(jobs) == 12 and all(job.status == "succeeded" for job in jobs)
    assert sorted(trial_number(job.id) for job in jobs) == list(range(12)), "a trial lost or run twice"
    for job in jobs:
        if job.id in finished_before:
            assert job.record == finished_before[job.id] and job.attempts == 1, "a finished trial ran again"
        trial = trials[trial_number(job.id)]
        assert job.record["config"]["lr"] == trial.params["lr"]
        assert job.record["loss"]["final"] == pytest.approx(trial.value)
    report = load_strict_json(output / "report.json")
    assert report["search"]["best"]["trial"] == study.best_trial.number
    assert report["search"]["best"]["value"] == pytest.approx(study.best_value)


# Over Ray Jobs: the search runs on the head, its study comes home line by line.


@pytest.mark.slow
def test_a_search_over_ray_jobs_brings_its_study_home_and_a_rerun_continues_it(tmp_path):
    from tests.test_remote import start_head_with_jobs_api

    head, jobs_address = start_head_with_jobs_api(tmp_path)
    try:
        output = tmp_path / "run"
        spec = write_search(tmp_path, trials=4, parallel=2)
        result = run_cli(["submit", str(spec), "--address", jobs_address, "--output", str(output), "--json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["search"]["best"]["trial"] in range(4)
        study, trials = study_trials(output)
        report = load_strict_json(output / "report.json")
        assert len(trials) == 4 and all(trial.state.name == "COMPLETE" for trial in trials)
        assert sorted(trial_number(job["id"]) for job in report["jobs"]) == [0, 1, 2, 3]
        for job in report["jobs"]:
            trial = trials[trial_number(job["id"])]
            assert job["config"]["lr"] == trial.params["lr"]
            assert job["loss"]["final"] == pytest.approx(trial.value)
        assert report["search"]["best"]["trial"] == study.best_trial.number
        assert report["cluster"]["embedded"] is False

        # More trials, from the client again: the head continues the study that came home.
        more = write_search(tmp_path, trials=6, parallel=2)
        again = run_cli(["submit", str(more), "--address", jobs_address, "--output", str(output)])
        assert again.exit_code == 0, again.stderr
        _, continued = study_trials(output)
        assert len(continued) == 6 and all(trial.state.name == "COMPLETE" for trial in continued)
        assert [trial.params for trial in continued[:4]] == [trial.params for trial in trials]
        with Ledger.open(output, for_writing=False) as ledger:
            rows = ledger.jobs()
        assert sorted(trial_number(row.id) for row in rows) == list(range(6))
        assert all(row.status == "succeeded" and row.attempts == 1 for row in rows), [
            (row.id, row.status, row.attempts) for row in rows
        ]
    finally:
        head.stop()
