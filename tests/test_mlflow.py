"""Tracking in MLflow: `submit --mlflow`, `runjobs export`, and a tracking server that is down.

The slow tests start a real `mlflow server` on loopback (SQLite backend, artifacts served
by the server, as a shared tracking server serves them), end it by its handle, and read
the runs back through MlflowClient as a user would see them. Their jobs run in this
process (the pipeline with the in-process executor), except one end-to-end submit on
Ray. The quick tests check the command line's refusals without any server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.pipeline import submit
from jobs.plan.planning import SubmitRequest
from jobs.record.ledger import Ledger
from jobs.run.in_process import InProcessExecutor
from jobs.run.progress import LineProgress
from tests.helpers import free_port, load_strict_json, run_cli

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
EXPERIMENT = "runjobs"

# A torch model that fails while RUNJOBS_TEST_MODEL_FAILS is set: a failed job that a
# re-run (`--rerun failed`, the variable unset) turns into a succeeded one.
SWITCHABLE_MODEL = """\
import os

import torch


def build_torch(features, config):
    if os.environ.get("RUNJOBS_TEST_MODEL_FAILS"):
        raise RuntimeError("this model fails on purpose")
    return torch.nn.Sequential(torch.nn.Linear(features, 1))
"""


@pytest.fixture(autouse=True)
def no_telemetry():
    """MLflow's client would report usage to MLflow's servers; conftest restores the environment."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


class MlflowServer:
    """An `mlflow server` process this test owns, ended by its handle (its whole process group).

    Job execution (a runner and huey consumers for GenAI scorers) is turned off: a tracking
    server needs none of it.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        environment = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with (self.directory / "server.log").open("a") as log:
            self.process = subprocess.Popen(
                [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
                 "--artifacts-destination", str(self.directory / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mlflow server did not come up:\n{self.log()}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s; then every process of it is gone."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait()
        self.process = None
        deadline = time.monotonic() + 15
        while _group_alive(group):  # its uvicorn worker exits just after the server
            if time.monotonic() > deadline:
                os.killpg(group, signal.SIGKILL)
                raise AssertionError(f"mlflow server left processes behind in group {group}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.directory / "server.log").read_text()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield running
    finally:
        running.stop()


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parent_run(client, run_id: str):
    """The parent MLflow run of a runjobs run, found as a user would: by its tag."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`runjobs.run_id` = '{run_id}'")
    return parent


def child_runs(client, parent) -> dict:
    """The parent's active child runs, by job id."""
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_job = {child.data.tags["runjobs.job_id"]: child for child in children}
    assert len(by_job) == len(children), "two child runs for one job"
    return by_job


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    return {entry.path for entry in client.list_artifacts(run_id, path)}


class Said(LineProgress):
    """Progress that keeps what the run says (the tracker's one line among it) instead of printing."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def say(self, message: str) -> None:
        self.lines.append(message)


def sweep_request(tmp_path: Path, output: Path, epochs: int = 30, save_models: bool = True) -> SubmitRequest:
    """Two torch jobs (seeds 0 and 1) and one of a user model that fails while the variable is set."""
    model = tmp_path / "switchable_model.py"
    model.write_text(SWITCHABLE_MODEL)
    sweep = tmp_path / "sweep.yaml"
    defaults = {"framework": "torch", "epochs": epochs, "save_models": save_models}
    sweep.write_text(
        f"name: tracked\ndefaults: {json.dumps(defaults)}\n"
        f"grid: {{seed: [0, 1]}}\njobs: [{{model: {model}}}]\n"
    )
    return SubmitRequest(spec_file=sweep, output=output)


def run_in_process(request: SubmitRequest, tracker=None, progress=None, rerun=None):
    request.rerun = rerun
    try:
        return submit(request, progress or Said(), executor=InProcessExecutor(), tracker=tracker)
    finally:
        request.rerun = None


@pytest.fixture(scope="module")
def tracked_run(server, tmp_path_factory):
    """A sweep submitted with an MLflow tracker: two succeeded torch jobs, one failed."""
    from jobs.report.mlflow_tracking import MlflowTracker

    directory = tmp_path_factory.mktemp("tracked")
    output = directory / "run"
    saved = os.environ.get("RUNJOBS_TEST_MODEL_FAILS")
    os.environ["RUNJOBS_TEST_MODEL_FAILS"] = "1"
    try:
        progress = Said()
        outcome = run_in_process(
            sweep_request(directory, output), MlflowTracker(server.uri, progress.say), progress
        )
    finally:
        os.environ.pop("RUNJOBS_TEST_MODEL_FAILS", None)
        if saved is not None:
            os.environ["RUNJOBS_TEST_MODEL_FAILS"] = saved
    return outcome, progress.lines, directory


@pytest.mark.slow
def test_submit_logs_a_parent_run_with_the_report_and_a_child_run_per_job(server, tracked_run):
    outcome, said, _ = tracked_run
    report = outcome.report
    assert outcome.exit_code == 1 and not [line for line in said if "MLflow" in line]
    client = client_for(server.uri)
    parent = parent_run(client, report["run_id"])
    assert parent.info.run_name == report["run_id"]
    assert parent.info.status == "FAILED", "a run with a failed job"
    assert {"report.html", "report.json"} <= artifact_paths(client, parent.info.run_id)
    assert (parent.data.metrics["jobs/succeeded"], parent.data.metrics["jobs/failed"]) == (2, 1)

    children = child_runs(client, parent)
    jobs = {job["id"]: job for job in report["jobs"]}
    assert set(children) == set(jobs)
    for job_id, child in children.items():
        job, tags = jobs[job_id], child.data.tags
        assert child.info.run_name == job_id
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["runjobs.framework"], tags["runjobs.variant"], tags["runjobs.status"]) == (
            "torch", "single", job["status"],
        )  # fmt: skip
        assert child.data.params["epochs"] == "30" and child.data.params["framework"] == "torch"
        assert set(child.data.params) == set(job["config"])
        assert {"logs", "record.json"} <= artifact_paths(client, child.info.run_id)
        assert artifact_paths(client, child.info.run_id, "logs") == {
            f"logs/{job_id}.out",
            f"logs/{job_id}.err",
        }

    succeeded = next(job for job in report["jobs"] if job["status"] == "succeeded")
    child = children[succeeded["id"]]
    assert child.info.status == "FINISHED"
    assert child.data.tags["runjobs.convergence"] == succeeded["convergence"]
    assert child.data.params["lr"] == json.dumps(succeeded["config"]["lr"])
    history = client.get_metric_history(child.info.run_id, "loss/train")
    assert [point.step for point in history] == list(range(30))
    assert [point.value for point in history] == pytest.approx(succeeded["loss"]["history"], rel=1e-6)
    assert child.data.metrics["result/final_loss"] == pytest.approx(succeeded["loss"]["final"])
    assert child.data.metrics["time/train_s"] == pytest.approx(succeeded["timings"]["train_s"])
    assert "model/model.json" in artifact_paths(client, child.info.run_id, "model")

    failed = next(job for job in report["jobs"] if job["status"] == "failed")
    child = children[failed["id"]]
    assert child.info.status == "FAILED"
    assert "fails on purpose" in child.data.tags["runjobs.error"]
    assert "model" not in artifact_paths(client, child.info.run_id)


@pytest.mark.slow
def test_export_adds_nothing_twice_and_a_rerun_replaces_only_the_job_that_changed(server, tracked_run):
    outcome, _, directory = tracked_run
    output, run_id = outcome.output_dir, outcome.report["run_id"]
    client = client_for(server.uri)
    before = {
        job_id: child.info.run_id for job_id, child in child_runs(client, parent_run(client, run_id)).items()
    }

    for _ in range(2):  # what submit logged, then what the first export logged
        exported = run_cli(["export", str(output), "--mlflow", server.uri])
        assert exported.exit_code == 0, exported.stderr
        assert "0 job(s) logged, 0 replaced, 3 already there" in exported.stdout
    parent = parent_run(client, run_id)
    children = child_runs(client, parent)
    assert {job_id: child.info.run_id for job_id, child in children.items()} == before
    succeeded = next(child for child in children.values() if child.data.tags["runjobs.status"] == "succeeded")
    assert len(client.get_metric_history(succeeded.info.run_id, "loss/train")) == 30
    assert len(client.get_metric_history(parent.info.run_id, "jobs/failed")) == 1

    # The failed job runs again and succeeds: the next export replaces its child run only.
    rerun = run_in_process(sweep_request(directory, output), rerun="failed")
    assert rerun.ran == 1 and rerun.exit_code == 0
    exported = run_cli(["export", str(output), "--mlflow", server.uri])
    assert exported.exit_code == 0, exported.stderr
    assert "0 job(s) logged, 1 replaced, 2 already there" in exported.stdout
    assert f"view: {server.uri}/#/experiments/" in exported.stdout
    parent = parent_run(client, run_id)
    after = child_runs(client, parent)
    (changed,) = [job_id for job_id in before if after[job_id].info.run_id != before[job_id]]
    assert (
        after[changed].data.tags["runjobs.status"] == "succeeded" and after[changed].info.status == "FINISHED"
    )
    assert client.get_run(before[changed]).info.lifecycle_stage == "deleted"
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs/failed"] == 0


@pytest.mark.slow
def test_a_stopped_job_is_a_finished_child_run_tagged_stopped(server, tmp_path):
    from jobs.report.mlflow_tracking import MlflowTracker

    # The median rule stops the lr 0.0002 job at its first judged report (epoch 50).
    sweep = tmp_path / "stopping.yaml"
    sweep.write_text(
        "defaults: {framework: torch, epochs: 200}\ngrid: {lr: [0.1, 0.08, 0.06, 0.0002]}\n"
        "stopping: {rule: median, every: 10, grace: 50, min_jobs: 2}\n"
    )
    progress = Said()
    outcome = run_in_process(
        SubmitRequest(spec_file=sweep, output=tmp_path / "run"),
        MlflowTracker(server.uri, progress.say),
        progress,
    )
    assert outcome.exit_code == 0
    (stopped,) = [job for job in outcome.report["jobs"] if job["status"] == "stopped"]
    client = client_for(server.uri)
    parent = parent_run(client, outcome.report["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs/stopped"] == 1
    child = child_runs(client, parent)[stopped["id"]]
    assert (child.data.tags["runjobs.status"], child.info.status) == ("stopped", "FINISHED")
    assert len(client.get_metric_history(child.info.run_id, "loss/train")) == 50


@pytest.mark.slow
def test_a_server_that_is_down_costs_the_run_nothing_and_export_logs_it_once_it_is_back(tmp_path):
    from jobs.report.mlflow_tracking import MlflowTracker

    server = MlflowServer(tmp_path).start()
    server.stop()  # the address where it was now refuses connections

    class TimedTracker(MlflowTracker):
        """The tracker, timing how long the run spent in it."""

        spent_s = 0.0

        def job_kept(self, outcome, output_dir):
            started = time.monotonic()
            super().job_kept(outcome, output_dir)
            self.spent_s += time.monotonic() - started

    output = tmp_path / "run"
    progress = Said()
    tracker = TimedTracker(server.uri, progress.say)
    outcome = run_in_process(sweep_request(tmp_path, output, epochs=10, save_models=False), tracker, progress)
    assert outcome.exit_code == 0, "its jobs all succeeded: MLflow's absence changes nothing"
    with Ledger.open(output, for_writing=False) as ledger:
        assert [job.status for job in ledger.jobs()] == ["succeeded"] * 3
    (message,) = [line for line in progress.lines if "MLflow" in line]
    assert message == (
        f"MLflow at {server.uri} is unreachable (connection refused): results are in {output}; "
        f"log them later with: runjobs export {output} --mlflow {server.uri}"
    )
    assert tracker.spent_s < 10, "a dead server costs seconds once, not a wait per job"

    down = run_cli(["export", str(output), "--mlflow", server.uri])
    assert down.exit_code == 3
    assert down.stderr.count("\n") == 1 and "is unreachable (connection refused)" in down.stderr

    server.start()
    try:
        exported = run_cli(["export", str(output), "--mlflow", server.uri])
        assert exported.exit_code == 0, exported.stderr
        assert "3 job(s) logged" in exported.stdout
        client = client_for(server.uri)
        parent = parent_run(client, outcome.report["run_id"])
        assert parent.info.status == "FINISHED"
        assert len(child_runs(client, parent)) == 3
    finally:
        server.stop()


@pytest.mark.slow
def test_submit_with_mlflow_end_to_end_on_ray(ray_session, server, tmp_path):
    result = run_cli(["submit", "--mlflow", server.uri, "--epochs", "50"], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "View run" not in result.stdout, "MLflow's own links stay off the summary's stdout"
    report = load_strict_json(tmp_path / "run" / "report.json")
    client = client_for(server.uri)
    parent = parent_run(client, report["run_id"])
    assert parent.info.status == "FINISHED"
    assert {"report.html", "report.json"} <= artifact_paths(client, parent.info.run_id)
    children = child_runs(client, parent)
    assert {child.data.tags["runjobs.framework"] for child in children.values()} == {"tensorflow", "torch"}
    for child in children.values():
        steps = [point.step for point in client.get_metric_history(child.info.run_id, "loss/train")]
        assert steps == list(range(50))


# ---- refused before anything starts: no server needed ------------------------------------


def test_a_bare_mlflow_without_mlflow_tracking_uri_is_one_line_and_exit_2(tmp_path):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    result = run_cli(["submit", "--mlflow"], tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "MLFLOW_TRACKING_URI, which is not set" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bare_mlflow_before_a_spec_file_says_where_to_put_it(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid: {framework: [torch]}\n")
    result = run_cli(["submit", "--mlflow", str(sweep), "--dry-run"])
    assert result.exit_code == 2
    assert "put a bare --mlflow after the spec file" in result.stderr


def test_mlflow_tracking_uri_without_a_scheme_is_refused_naming_the_variable(tmp_path):
    os.environ["MLFLOW_TRACKING_URI"] = "localhost:5000"
    result = run_cli(["submit", "--mlflow", "--dry-run"])
    assert result.exit_code == 2
    assert "MLFLOW_TRACKING_URI='localhost:5000' is not a tracking URI" in result.stderr


def test_without_mlflow_installed_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails, as when not installed
    result = run_cli(["submit", "--mlflow", "http://127.0.0.1:5000", "--dry-run"])
    assert result.exit_code == 2
    assert "pip install 'runjobs[mlflow]'" in result.stderr


def test_export_refuses_a_directory_that_is_not_a_run_and_a_missing_mlflow(tmp_path):
    not_a_run = run_cli(["export", str(tmp_path), "--mlflow", "http://127.0.0.1:5000"])
    assert not_a_run.exit_code == 2 and "holds no runjobs ledger" in not_a_run.stderr
    Ledger.open(tmp_path / "run", for_writing=True).close()
    no_target = run_cli(["export", str(tmp_path / "run")])
    assert no_target.exit_code == 2 and "--mlflow URI" in no_target.stderr


def test_export_to_a_server_that_does_not_answer_is_exit_3_within_seconds(tmp_path):
    Ledger.open(tmp_path / "run", for_writing=True).close()
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_cli(["export", str(tmp_path / "run"), "--mlflow", uri])
    assert result.exit_code == 3
    unreachable = f"MLflow at {uri} is unreachable (connection refused); run this again once it answers"
    assert result.stderr == f"runjobs: error: {unreachable}\n"
    assert time.monotonic() - started < 10


def test_help_imports_no_mlflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from jobs.cli import cli\n"
        "for args in (['submit', '--help'], ['export', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "print('mlflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
