"""TensorBoard event files for every job, read back as TensorBoard reads them, and `runjobs tensorboard`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from jobs.report.tensorboard import event_files, write_event_files
from tests.helpers import RUNJOBS, free_port, load_strict_json, run_cli, stop_process

SHARED_TAGS = {
    "loss/train", "parameters/weight", "parameters/bias", "time/epoch_s",
    "time/startup_s", "time/setup_s", "time/train_s", "time/predict_s", "result/final_loss", "result/r2_gap",
}  # fmt: skip


def job_record(job_id, framework, epochs=5, features=1, normalize=False, status="succeeded"):
    """A job as report.json holds it, with a history shaped like a real run's."""
    config = {"framework": framework, "variant": "single", "epochs": epochs, "lr": 0.01, "seed": 3,
              "optimizer": "adam", "normalize": normalize, "predict": [[1800.0]], "target": None}  # fmt: skip
    record = {"id": job_id, "framework": framework, "variant": "single", "config": config, "status": status}
    if status != "succeeded":
        return {**record, "loss": None, "history": None, "timings": {}}
    return {
        **record,
        "loss": {
            "final": 0.25,
            "r2_gap": 3e-7,
            "history_units": "standardised" if normalize else "original",
            "history": [100.0 / (epoch + 1) for epoch in range(epochs)],
        },
        "history": {
            "epoch_s": [0.001 * (epoch + 1) for epoch in range(epochs)],
            "weights": [[0.1 * epoch + feature for feature in range(features)] for epoch in range(epochs)],
            "bias": [-0.5 * epoch for epoch in range(epochs)],
        },
        "timings": {"startup_s": 2.5, "setup_s": 0.4, "train_s": 0.015, "predict_s": 0.002, "queued_s": 0.1},
    }


def read_back(job_directory: Path):
    """Load a job's directory with TensorBoard's own reader: (scalars {tag: [(step, value)]}, accumulator)."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(job_directory), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    scalars = {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    return scalars, accumulator


def test_each_jobs_history_reads_back_per_epoch_under_framework_neutral_tags(tmp_path):
    records = [job_record("tensorflow-a1", "tensorflow"), job_record("torch-b2", "torch")]
    write_event_files({"jobs": records}, tmp_path)

    tags_by_job = {}
    for record in records:
        scalars, _ = read_back(tmp_path / "tensorboard" / record["id"])
        tags_by_job[record["id"]] = set(scalars)
        steps = list(range(5))
        assert [step for step, _ in scalars["loss/train"]] == steps
        assert [value for _, value in scalars["loss/train"]] == pytest.approx(record["loss"]["history"])
        assert [value for _, value in scalars["parameters/weight"]] == pytest.approx(
            [row[0] for row in record["history"]["weights"]]
        )
        assert [value for _, value in scalars["parameters/bias"]] == pytest.approx(record["history"]["bias"])
        assert [value for _, value in scalars["time/epoch_s"]] == pytest.approx(record["history"]["epoch_s"])
        # The job's totals are one point at its last epoch.
        assert scalars["time/train_s"] == [(4, pytest.approx(0.015))]
        assert scalars["result/r2_gap"] == [(4, pytest.approx(3e-7))]
    assert tags_by_job["tensorflow-a1"] == tags_by_job["torch-b2"] == SHARED_TAGS


def test_hyperparameters_let_tensorboard_filter_runs_by_framework_and_learning_rate(tmp_path):
    from tensorboard.plugins.hparams import metadata

    write_event_files([job_record("torch-b2", "torch")], tmp_path)
    _, accumulator = read_back(tmp_path / "tensorboard" / "torch-b2")
    content = accumulator.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    session = metadata.parse_session_start_info_plugin_data(content)
    assert session.group_name == "torch-b2"
    assert session.hparams["framework"].string_value == "torch"
    assert session.hparams["lr"].number_value == pytest.approx(0.01)
    assert session.hparams["normalize"].bool_value is False
    assert "predict" not in session.hparams  # lists are not hyperparameters TensorBoard can filter on


def test_several_features_and_a_standardised_loss_get_their_own_tags(tmp_path):
    write_event_files([job_record("torch-k3", "torch", features=3, normalize=True)], tmp_path)
    scalars, _ = read_back(tmp_path / "tensorboard" / "torch-k3")
    assert {"parameters/weight_1", "parameters/weight_2", "parameters/weight_3"} <= set(scalars)
    assert "parameters/weight" not in scalars
    assert [value for _, value in scalars["parameters/weight_3"]] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4])
    # Not overlaid with losses in the data's units: another scale.
    assert "loss/train" not in scalars and len(scalars["loss/train_standardised"]) == 5


def test_writing_again_replaces_a_jobs_file_instead_of_adding_a_second(tmp_path):
    records = [job_record("tensorflow-a1", "tensorflow"), job_record("torch-b2", "torch")]
    write_event_files(records, tmp_path)
    first, _ = read_back(tmp_path / "tensorboard" / "torch-b2")
    write_event_files(records, tmp_path)
    write_event_files(records, tmp_path)

    assert len(event_files(tmp_path)) == 2  # one per job
    again, _ = read_back(tmp_path / "tensorboard" / "torch-b2")
    assert again == first
    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["tensorflow-a1", "torch-b2"]


def test_failed_jobs_get_no_files_and_lose_an_earlier_attempts(tmp_path):
    write_event_files([job_record("torch-b2", "torch")], tmp_path)
    write_event_files(
        [
            job_record("torch-b2", "torch", status="failed"),
            job_record("tensorflow-c3", "tensorflow", status="cancelled"),
        ],
        tmp_path,
    )
    assert event_files(tmp_path) == []


def test_writing_event_files_imports_no_framework(tmp_path):
    # `runjobs report` rebuilds these files; a framework import would cost it seconds.
    records_path = tmp_path / "records.json"
    records_path.write_text(json.dumps([job_record("torch-b2", "torch")]))
    program = (
        "import json, sys; from jobs.report.tensorboard import write_event_files; "
        "write_event_files(json.load(open(sys.argv[1])), sys.argv[2]); "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'tensorflow', 'torch', 'keras'}))"
    )
    finished = subprocess.run(
        [sys.executable, "-c", program, str(records_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"
    assert len(event_files(tmp_path)) == 1


def test_tensorboard_command_on_a_run_without_files_says_what_to_type(tmp_path):
    from jobs.record.ledger import Ledger

    Ledger.open(tmp_path, for_writing=True).close()
    result = run_cli(["tensorboard", str(tmp_path)])
    assert result.exit_code == 2
    assert f"run `runjobs report {tmp_path}` to write them" in result.stderr

    result = run_cli(["tensorboard", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "holds no runjobs run" in result.stderr


def test_tensorboard_command_prints_the_command_when_tensorboard_is_missing(tmp_path, monkeypatch):
    write_event_files([job_record("torch-b2", "torch")], tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    result = run_cli(["tensorboard", str(tmp_path), "--port", "6123"])
    assert result.exit_code == 1
    assert (
        result.stdout.strip()
        == f"tensorboard --logdir {tmp_path / 'tensorboard'} --host 127.0.0.1 --port 6123"
    )
    assert "pip install tensorboard" in result.stderr


def test_tensorboard_command_refuses_a_port_in_use(tmp_path):
    write_event_files([job_record("torch-b2", "torch")], tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["tensorboard", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_runjobs_tensorboard_serves_every_jobs_scalars_on_loopback(tmp_path):
    records = [job_record("tensorflow-a1", "tensorflow"), job_record("torch-b2", "torch")]
    write_event_files(records, tmp_path)
    port = free_port()
    log_path = tmp_path / "tensorboard.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [RUNJOBS, "tensorboard", str(tmp_path), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        runs = None
        while runs != ["tensorflow-a1", "torch-b2"]:
            assert server.poll() is None, f"TensorBoard exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"TensorBoard never listed both jobs:\n{log_path.read_text()}"
            try:
                runs = sorted(get_json(f"{base}/data/runs"))
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        query = urllib.parse.urlencode({"run": "torch-b2", "tag": "parameters/bias"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [(step, value) for _, step, value in points] == [
            (epoch, pytest.approx(bias)) for epoch, bias in enumerate(records[1]["history"]["bias"])
        ]
    finally:
        stop_process(server)
    assert f"--host 127.0.0.1 --port {port}" in log_path.read_text()


@pytest.mark.slow
def test_a_real_submit_writes_both_frameworks_files_and_report_rebuilds_them(ray_session, tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(["submit", "--epochs", "60"], output_dir)
    assert result.exit_code == 0, result.stderr
    report = load_strict_json(output_dir / "report.json")

    def final_values():
        values = {}
        for job in report["jobs"]:
            scalars, _ = read_back(output_dir / "tensorboard" / job["id"])
            assert set(scalars) == SHARED_TAGS
            assert [step for step, _ in scalars["loss/train"]] == list(range(60))
            values[job["framework"]] = (
                scalars["parameters/weight"][-1][1],
                scalars["parameters/bias"][-1][1],
            )
        return values

    first = final_values()
    assert set(first) == {"tensorflow", "torch"}
    for job in report["jobs"]:
        weight, bias = first[job["framework"]]
        assert weight == pytest.approx(job["params"]["weights"][0], rel=1e-6)
        assert bias == pytest.approx(job["params"]["bias"], rel=1e-6, abs=1e-9)

    rebuilt = run_cli(["report", str(output_dir)])
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert len(event_files(output_dir)) == 2
    assert final_values() == first
