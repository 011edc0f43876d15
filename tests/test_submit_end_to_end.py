"""`runjobs submit` end to end on a real embedded Ray, training real TensorFlow and torch."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

JOB_KEYS = {
    "id", "framework", "variant", "workers", "config", "status", "error", "convergence", "params",
    "reference", "loss", "predictions", "timings", "placement", "versions",
}  # fmt: skip
TIMING_KEYS = {"queued_s", "startup_s", "setup_s", "train_s", "epoch_s_median", "predict_s", "total_s"}


FRAMEWORK_MODULES = ("tensorflow", "torch", "keras")


@pytest.fixture(scope="module")
def default_run(ray_session, tmp_path_factory):
    """The built-in comparison, run once through the CLI for every test in this module."""
    modules_before = set(sys.modules)
    result = run_cli(["submit"], tmp_path_factory.mktemp("default") / "run")
    result.driver_imports = {name.split(".")[0] for name in set(sys.modules) - modules_before}
    return result


def test_the_driver_never_imports_a_framework(default_run):
    # Results must hold plain values: unpickling a framework object (torch's
    # TorchVersion, say) would import the whole framework into the driver.
    assert not default_run.driver_imports & set(FRAMEWORK_MODULES)


def jobs_by_framework(report):
    return {job["framework"]: job for job in report["jobs"]}


def test_default_comparison_succeeds_and_both_frameworks_converge(default_run):
    assert default_run.exit_code == 0, default_run.stderr
    jobs = jobs_by_framework(default_run.report())
    assert set(jobs) == {"tensorflow", "torch"}
    for job in jobs.values():
        assert job["status"] == "succeeded"
        assert job["convergence"] == "converged"
        assert abs(job["params"]["weights"][0] - 0.2) < 0.002
        assert job["predictions"][0]["input"] == [1800.0]
        assert job["predictions"][0]["output"] == pytest.approx(360.0, rel=0.005)


def test_frameworks_agree_with_the_same_initial_parameters_and_adam_settings(default_run):
    jobs = jobs_by_framework(default_run.report())
    tensorflow, torch = jobs["tensorflow"], jobs["torch"]
    assert {**tensorflow["config"], "framework": None} == {**torch["config"], "framework": None}
    for first, second in zip(
        [*tensorflow["params"]["weights"], tensorflow["params"]["bias"]],
        [*torch["params"]["weights"], torch["params"]["bias"]],
    ):
        assert first == pytest.approx(second, rel=1e-4)
    pair = default_run.report()["comparison"]["pairs"][0]
    assert pair["same_config"] is True
    assert pair["max_param_difference"]["relative"] <= 1e-4


def test_report_json_holds_the_contract(default_run):
    report = default_run.report()
    assert {"run_id", "cluster", "jobs", "comparison"} <= set(report)
    assert {"address", "nodes", "cpus", "gpus"} <= set(report["cluster"])
    assert report["cluster"]["nodes"] == 1 and report["cluster"]["gpus"] == 0
    for job in report["jobs"]:
        assert JOB_KEYS <= set(job)
        assert (job["variant"], job["workers"], job["error"]) == ("single", 1, None)
        assert job["config"]["batch_size"] == 10, "the full batch is resolved to the row count"
        assert job["config"]["gpus_per_job"] == 0, "no GPUs in the cluster means 0 per job"
        assert job["reference"]["weights"] == pytest.approx([0.2])
        assert job["reference"]["bias"] == pytest.approx(0.0, abs=1e-9)
        # 500 epochs, kept as 100 spread evenly (MAX_HISTORY_EPOCHS), named in history_epochs.
        assert len(job["loss"]["history"]) == len(job["history_epochs"]) == 100
        assert job["history_epochs"][-1] == 500
        assert job["loss"]["history"][-1] < job["loss"]["history"][0]
        assert TIMING_KEYS <= set(job["timings"])
        assert all(value >= 0 for value in job["timings"].values())
        assert job["timings"]["total_s"] >= job["timings"]["train_s"]
        assert {"node_id", "hostname", "device", "gpu_ids"} <= set(job["placement"])
        assert job["placement"]["device"] == "cpu" and job["placement"]["gpu_ids"] == []
        assert {"python", "ray", job["framework"], "numpy"} <= set(job["versions"])
    pair = report["comparison"]["pairs"][0]
    assert pair["jobs"] == {"tensorflow": "tensorflow", "torch": "torch"}
    for side in pair["frameworks"].values():
        assert {"weights", "bias", "gap_to_optimum", "predictions", "startup_s", "train_s"} <= set(side)
    ratio = pair["train_time_ratio"]["tensorflow/torch"]
    tensorflow, torch = jobs_by_framework(report)["tensorflow"], jobs_by_framework(report)["torch"]
    assert ratio == pytest.approx(tensorflow["timings"]["train_s"] / torch["timings"]["train_s"])


def test_csv_markdown_and_the_ledger_match_the_json(default_run):
    report = default_run.report()
    with (default_run.output_dir / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [job["id"] for job in report["jobs"]]
    for row, job in zip(rows, report["jobs"]):
        assert float(row["weights"]) == job["params"]["weights"][0]
        assert row["convergence"] == job["convergence"]
    markdown = (default_run.output_dir / "report.md").read_text()
    assert report["run_id"] in markdown and "| tensorflow | converged |" in markdown
    for job in report["jobs"]:
        shown = run_cli(["show", str(default_run.output_dir), job["id"]])
        assert shown.exit_code == 0
        assert json.loads(shown.stdout)["record"]["params"] == job["params"]


def test_the_printed_table_compares_both_frameworks_with_the_optimum(default_run):
    lines = default_run.stdout.splitlines()
    assert lines[0].split()[:4] == ["job", "result", "w", "b"]
    assert any(line.startswith("tensorflow") and "converged" in line for line in lines)
    assert any(line.startswith("torch") and "converged" in line for line in lines)
    assert any(line.startswith("optimum") for line in lines)
    assert all(len(line) <= 80 for line in lines[:5]), "the table fits 80 columns"
    assert f"report: {default_run.output_dir / 'report.json'}" in default_run.stdout


def test_article_preset_reproduces_tensorflows_failure_to_converge(ray_session, tmp_path):
    result = run_cli(["submit", "--preset", "article"], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    report = result.report()
    jobs = jobs_by_framework(report)
    assert jobs["tensorflow"]["convergence"] == "not_converged"
    assert jobs["tensorflow"]["params"]["weights"][0] < 0, (
        "the article's TensorFlow run learns a negative slope"
    )
    assert jobs["tensorflow"]["config"]["lr"] == 0.001 and jobs["tensorflow"]["config"]["loop"] == "article"
    assert jobs["torch"]["convergence"] == "converged"
    pair = report["comparison"]["pairs"][0]
    assert pair["same_config"] is False
    assert {"lr", "epsilon", "batch_size"} <= set(pair["differing_fields"])
    assert pair["max_param_difference"] is None


def test_a_diverging_setting_is_reported_as_diverged_never_as_nan(ray_session, tmp_path):
    result = run_cli(["submit", "--optimizer", "sgd", "--lr", "1", "--epochs", "50"], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    text = (result.output_dir / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    for job in result.report()["jobs"]:
        assert job["status"] == "succeeded"
        assert job["convergence"] == "diverged"
        assert job["params"]["weights"] == [None] or not math.isfinite(
            job["params"]["weights"][0] or math.inf
        )


def test_normalized_training_reports_parameters_in_the_datas_units(ray_session, tmp_path):
    result = run_cli(
        ["submit", "--data", "synthetic:rows=200,features=3,noise=0.05,seed=3", "--normalize",
         "--lr", "0.05", "--epochs", "300", "--predict", "0.5,-0.5,0.25"],
        tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for job in result.report()["jobs"]:
        assert job["convergence"] == "converged"
        assert job["loss"]["history_units"] == "standardised"
        assert job["params"]["weights"] == pytest.approx(job["reference"]["weights"], abs=1e-3)
        assert job["params"]["bias"] == pytest.approx(job["reference"]["bias"], abs=1e-3)
        expected = sum(w * x for w, x in zip(job["reference"]["weights"], [0.5, -0.5, 0.25]))
        assert job["predictions"][0]["output"] == pytest.approx(expected + job["reference"]["bias"], abs=1e-2)


def test_csv_data_with_named_columns_and_minibatches(ray_session, tmp_path):
    path = tmp_path / "houses.csv"
    rows = ["price,size,age"] + [f"{0.2 * size:.1f},{size},{size % 7}" for size in range(500, 2751, 125)]
    path.write_text("\n".join(rows) + "\n")
    result = run_cli(
        ["submit", "--data", str(path), "--set", "target=price", "--set", "features=size",
         "--batch-size", "4", "--epochs", "200", "--framework", "torch", "--framework", "tensorflow"],
        tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for job in result.report()["jobs"]:
        assert job["config"]["batch_size"] == 4
        assert job["reference"]["weights"] == pytest.approx([0.2], rel=1e-6)
        assert job["convergence"] == "converged"
        assert abs(job["params"]["weights"][0] - 0.2) < 0.002


def test_a_gpu_request_the_cluster_cannot_meet_is_refused_with_the_numbers(ray_session, tmp_path):
    result = run_cli(["submit", "--gpus-per-job", "1"], tmp_path / "run")
    assert result.exit_code == 2
    assert "asks for 1 GPU(s) on one node but the largest node of the cluster" in result.stderr
    assert "has 0" in result.stderr
    assert not result.output_dir.exists()


def test_each_jobs_output_is_kept_and_shown_by_runjobs_logs(default_run):
    for framework in ("tensorflow", "torch"):
        shown = run_cli(["logs", str(default_run.output_dir), framework, "--stream", "stdout"])
        assert shown.exit_code == 0
        assert f"runjobs: {framework} single job, rank 0 of 1" in shown.stdout
        assert "runjobs: converged, final loss" in shown.stdout
    unknown = run_cli(["logs", str(default_run.output_dir), "jax"])
    assert unknown.exit_code == 2 and "no job 'jax'" in unknown.stderr
