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

from jobs.report import tensorboard
from jobs.report.tensorboard import MAX_JOB_RUNS, event_files, write_event_files
from tests.helpers import RUNJOBS, free_port, load_strict_json, run_cli, stop_process

SHARED_TAGS = {
    "loss/train", "parameters/weight", "parameters/bias", "time/epoch_s",
    "time/startup_s", "time/setup_s", "time/train_s", "time/predict_s", "result/final_loss", "result/r2_gap",
}  # fmt: skip


def job_record(job_id, framework, epochs=5, features=1, normalize=False, status="succeeded"):
    """A job as report.json holds it, with a history shaped like a real run's."""
    config = {"framework": framework, "variant": "single", "epochs": epochs, "lr": 0.01, "seed": 3,
              "optimizer": "adam", "normalize": normalize, "predict": [[1800.0]], "target": None}  # fmt: skip
    record = {"id": job_id, "framework": framework, "variant": "single", "config": config, "status": status,
              "convergence": "converged", "params": {"weights": [0.1] * features, "bias": -0.5}}  # fmt: skip
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


def test_a_thinned_history_is_written_at_its_recorded_epochs(tmp_path):
    record = job_record("torch-b2", "torch", epochs=4)
    record["history_epochs"] = [1, 2, 50, 100]  # a 100-epoch job kept 4 epochs (workers/entry.py)
    record["history"]["epoch_s"] = [0.5] * 4
    write_event_files([record], tmp_path)

    scalars, accumulator = read_back(tmp_path / "tensorboard" / "torch-b2")
    assert [step for step, _ in scalars["loss/train"]] == [0, 1, 49, 99]  # epoch 1 is step 0, as before
    assert [value for _, value in scalars["parameters/bias"]] == pytest.approx(record["history"]["bias"])
    assert scalars["result/final_loss"] == [(99, pytest.approx(0.25))]
    # Each kept epoch's time stands for the epochs since the one before: 100 epochs of 0.5 s.
    wall_times = [event.wall_time for event in accumulator.Scalars("loss/train")]
    assert wall_times[-1] - wall_times[0] == pytest.approx(0.5 * 99, abs=0.01)


def seed_sweep(seeds, learning_rates=(0.1, 0.01, 0.001, 0.0001, 0.00001), frameworks=("tensorflow", "torch")):
    """Records of a sweep: every framework x learning rate x seed, each a 100-epoch job thinned to 4
    epochs whose loss is its seed above a curve, so a group's mean, min and max are known."""
    records = []
    for framework in frameworks:
        for learning_rate in learning_rates:
            for seed in range(seeds):
                record = job_record(f"{framework}-{len(records):04d}", framework, epochs=4)
                record["config"] = {**record["config"], "lr": learning_rate, "seed": seed}
                record["history_epochs"] = [1, 10, 50, 100]
                record["loss"]["history"] = [100.0 / epoch + seed for epoch in (1, 10, 50, 100)]
                record["loss"]["final"] = 1.0 + seed
                records.append(record)
    return records


def test_past_the_limit_each_group_of_seeds_is_one_run_of_its_mean_min_and_max(tmp_path):
    from tensorboard.plugins.hparams import metadata

    seeds = (MAX_JOB_RUNS + 50) // 10 + 1  # 2 frameworks x 5 learning rates: past the limit
    records = seed_sweep(seeds)
    assert len(records) > MAX_JOB_RUNS
    written = write_event_files({"jobs": records}, tmp_path)

    runs = sorted(path.name for path in written)
    assert runs == sorted(
        f"{framework},lr={rate}"
        for framework in ("tensorflow", "torch")
        for rate in (0.1, 0.01, 0.001, 0.0001, 1e-05)
    )
    assert len(event_files(tmp_path)) == 10
    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["seed_groups"]

    scalars, accumulator = read_back(tmp_path / "tensorboard" / "seed_groups" / "torch,lr=0.001")
    curve = [100.0 / epoch for epoch in (1, 10, 50, 100)]
    mean_seed = (seeds - 1) / 2
    assert scalars["loss/train"] == [
        (step, pytest.approx(value + mean_seed)) for step, value in zip([0, 9, 49, 99], curve)
    ]
    assert [value for _, value in scalars["loss/train_min"]] == pytest.approx(curve)
    assert [value for _, value in scalars["loss/train_max"]] == pytest.approx(
        [value + seeds - 1 for value in curve]
    )
    assert scalars["result/final_loss"] == [(99, pytest.approx(1.0 + mean_seed))]
    assert scalars["result/final_loss_max"] == [(99, pytest.approx(float(seeds)))]
    # Every job of a group had the same bias history, so its spread is none.
    assert scalars["parameters/bias_min"] == scalars["parameters/bias_max"] == scalars["parameters/bias"]
    assert {"parameters/weight", "time/epoch_s_max", "time/train_s_min"} <= set(scalars)

    content = accumulator.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    session = metadata.parse_session_start_info_plugin_data(content)
    assert session.hparams["lr"].number_value == pytest.approx(0.001)
    assert session.hparams["jobs"].number_value == seeds
    assert "seed" not in session.hparams


def test_the_runs_follow_the_report_from_jobs_to_groups_and_back(tmp_path):
    few = seed_sweep(2)
    write_event_files(few, tmp_path)
    assert len(event_files(tmp_path)) == len(few)  # below the limit: a run per job, as always

    many = few + seed_sweep(MAX_JOB_RUNS // 10 + 1)[len(few) :]
    write_event_files(many, tmp_path)
    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["seed_groups"]
    assert len(event_files(tmp_path)) == 10

    write_event_files(few, tmp_path)
    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == sorted(
        job["id"] for job in few
    )


def test_groups_past_the_limit_are_named_in_a_note_instead_of_written(tmp_path, monkeypatch):
    from tensorboard.plugins.text import metadata as text_metadata

    monkeypatch.setattr(tensorboard, "MAX_JOB_RUNS", 4)  # small, so the test writes few files
    records = seed_sweep(1, learning_rates=[0.1 / 2**index for index in range(6)], frameworks=("torch",))
    written = write_event_files(records, tmp_path)

    assert [path.name for path in written] == [f"torch,lr={0.1 / 2**index}" for index in range(4)]
    note = (tmp_path / "tensorboard" / "seed_groups" / "left_out.txt").read_text()
    assert note.startswith("2 of 6 groups of seeds (2 jobs) have no TensorBoard run")
    assert "torch,lr=0.003125: 1 job(s)" in note and "torch,lr=0.00625: 1 job(s)" in note
    # And TensorBoard itself says so, in its Text tab.
    _, accumulator = read_back(written[0])
    assert (
        accumulator.SummaryMetadata("runjobs/left_out").plugin_data.plugin_name == text_metadata.PLUGIN_NAME
    )


def test_jobs_a_stopping_rule_ended_are_a_group_of_their_own_over_every_epoch_any_reached(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tensorboard, "MAX_JOB_RUNS", 3)  # small, so the test writes few files
    records = seed_sweep(3, learning_rates=(0.1, 0.01), frameworks=("torch",))
    for seed, epochs in ((3, 2), (4, 3)):  # two more seeds of lr 0.1, stopped after 2 and 3 epochs
        record = job_record(f"torch-stopped{seed}", "torch", epochs=epochs, status="succeeded")
        record.update(status="stopped", config={**records[0]["config"], "seed": seed})
        record["loss"]["history"] = [1000.0 * (seed - 2)] * epochs
        records.append(record)
    written = write_event_files(records, tmp_path)

    assert [path.name for path in written] == ["torch,lr=0.1", "torch,lr=0.01", "torch,lr=0.1,stopped"]
    scalars, _ = read_back(written[2])
    assert scalars["loss/train"] == [(0, 1500.0), (1, 1500.0), (2, 2000.0)]  # the third epoch: one job
    assert scalars["loss/train_min"] == [(0, 1000.0), (1, 1000.0), (2, 2000.0)]


def test_event_records_are_framed_byte_for_byte_as_tensorboards_record_writer():
    import io
    import random

    from tensorboard.summary.writer.record_writer import RecordWriter

    generator = random.Random(7)
    payloads = [
        bytes(generator.getrandbits(8) for _ in range(length)) for length in (1, 8, 100, 255, 4097, 0, 3000)
    ]
    expected = io.BytesIO()
    writer = RecordWriter(expected)
    for payload in payloads:
        writer.write(payload)
    assert tensorboard.framed_records(payloads) == expected.getvalue()


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


def test_a_run_past_the_limit_rebuilt_from_its_ledger_writes_its_seed_groups(tmp_path):
    """runjobs report: the report's records are light (no per-epoch series), and still make the group runs."""
    from jobs.record.ledger import Ledger
    from jobs.record.records import empty_record
    from jobs.report.files import rebuild_report

    records = [
        {**empty_record(record["id"], {**record["config"], "workers": 1}, "succeeded", None), **record}
        for record in seed_sweep(MAX_JOB_RUNS // 5 + 1, frameworks=("torch",))  # one framework: no pairs
    ]
    with Ledger.open(tmp_path, for_writing=True) as ledger:
        ledger.add_jobs([(record["id"], record["config"]) for record in records])
        with ledger.batch():
            for record in records:
                ledger.mark(record["id"], "succeeded", record)
    rebuild_report(tmp_path)
    groups = sorted(path.name for path in (tmp_path / "tensorboard" / "seed_groups").iterdir())
    assert len(groups) == 5 and "torch,lr=0.1" in groups
    assert json.loads((tmp_path / "report.json").read_text())["jobs"][0]["history_epochs"] == [1, 10, 50, 100]
