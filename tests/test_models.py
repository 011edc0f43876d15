"""Exported models (`--save-models`) and `runjobs predict`: every format loads and predicts what the job did.

The quick tests export known parameters with real TensorFlow and torch and read every
format back through the CLI; the slow test trains through Ray and matches each format
against the job's recorded prediction.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from jobs.record.models import store_job_model
from tests.helpers import run_cli
from workers import frameworks
from workers.export import FORMAT_PREFERENCE, MANIFEST, export_linear

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "tf2onnx", "onnxscript"))
# Two features, so a model that mixed up the weights or dropped one would show.
WEIGHTS = [0.2, -3.5]
BIAS = 12.5
INPUTS = ["1800,3", "2000,4.5", "-7.25,0"]


def formats_of(framework):
    return [name for name in frameworks.formats(framework) if name != "onnx" or HAS_ONNX]


def exact(point):
    return sum(weight * value for weight, value in zip(WEIGHTS, point)) + BIAS


def predict_json(*args):
    result = run_cli(["predict", *map(str, args), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=["tensorflow", "torch"])
def exported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "model"
    written = export_linear(request.param, WEIGHTS, BIAS, directory, ["size", "rooms"], job_id="a-job")
    return request.param, directory, written


def test_export_writes_every_format_of_its_framework_and_a_manifest(exported):
    framework, directory, written = exported
    assert written == formats_of(framework)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["framework"] == framework
    assert manifest["feature_count"] == 2 and manifest["features"] == ["size", "rooms"]
    assert manifest["job_id"] == "a-job"
    assert manifest["formats"] == {name: frameworks.format_file(name) for name in written}
    for name in written:
        assert (directory / frameworks.format_file(name)).exists(), name


def test_every_format_round_trips_through_predict(exported):
    framework, directory, written = exported
    for name in written:
        # Both ways a user names a model: the job's directory with --format, or the file itself.
        for arguments in (
            [directory, "--format", name],
            [directory / frameworks.format_file(name)],
        ):
            predictions = predict_json(*arguments, *[item for text in INPUTS for item in ("--input", text)])
            assert [item["input"] for item in predictions] == [
                [float(value) for value in text.split(",")] for text in INPUTS
            ]
            for item in predictions:
                assert item["output"] == pytest.approx(exact(item["input"]), rel=1e-5), (name, arguments)


def test_a_model_directory_is_read_in_the_preferred_format_and_printed_one_line_per_input(exported):
    framework, directory, _ = exported
    result = run_cli(["predict", str(directory), "--input", "1800,3", "--input", "2000,4"])
    assert result.exit_code == 0, result.stderr
    preferred = {"tensorflow": "saved_model", "torch": "torchscript"}[framework]
    assert f"({preferred})" in result.stderr
    assert result.stdout.splitlines() == [
        f"1800,3 -> {exact((1800, 3)):.6g}",
        f"2000,4 -> {exact((2000, 4)):.6g}",
    ]


def test_a_diverged_model_predicts_null_in_json_and_nan_in_text(tmp_path):
    directory = tmp_path / "diverged"
    export_linear("torch", [float("nan")], float("inf"), directory)
    assert json.loads((directory / MANIFEST).read_text())["weights"] == [None]
    assert predict_json(directory, "--input", "1800") == [{"input": [1800.0], "output": None}]
    assert run_cli(["predict", str(directory), "--input", "1800"]).stdout == "1800 -> nan\n"


def test_the_wrong_number_of_features_is_refused_with_the_fix(exported):
    framework, directory, written = exported
    for name in written:
        result = run_cli(["predict", str(directory), "--format", name, "--input", "1800"])
        assert result.exit_code == 2, (name, result.stdout)
        assert "takes 2 feature(s) (size, rooms)" in result.stderr
        assert "--input 1,1" in result.stderr


def test_a_format_the_job_does_not_have_names_the_ones_it_has(exported):
    framework, directory, written = exported
    missing = next(name for name in FORMAT_PREFERENCE if name not in frameworks.formats(framework))
    result = run_cli(["predict", str(directory), "--format", missing, "--input", "1,2"])
    assert result.exit_code == 2
    available = [name for name in FORMAT_PREFERENCE if name in written]
    assert f"has no {missing} model; available: {', '.join(available)}" in result.stderr


def test_a_state_dict_holding_a_pickled_object_is_refused_and_never_run(tmp_path):
    import torch

    sentinel = tmp_path / "the-payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    malicious = tmp_path / "state_dict.pt"
    torch.save({"weight": Payload(), "bias": torch.zeros(1)}, malicious)
    result = run_cli(["predict", str(malicious), "--input", "1800"])
    assert result.exit_code == 2
    assert "refused" in result.stderr and "weights_only=True" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not sentinel.exists()


def test_a_state_dict_of_another_model_is_refused(tmp_path):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 2)}, other)
    result = run_cli(["predict", str(other), "--input", "1800"])
    assert result.exit_code == 2
    assert "not the state_dict of an nn.Linear(K, 1)" in result.stderr


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.pt", None, "does not exist"),
        ("model.txt", "x", "unknown model format"),
        ("model.pt", "x", "not a torch archive"),
        ("model.keras", "x", "cannot load it as a keras model"),
        ("model.onnx", "x", "cannot load it as a onnx model" if HAS_ONNX else "needs onnxruntime"),
        ("empty", "", "neither a runjobs model"),
    ],
)
def test_a_bad_model_path_is_one_line_and_exit_2(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    result = run_cli(["predict", str(path), "--input", "1800"])
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_run_directory_is_answered_with_its_jobs_model_directories(tmp_path):
    (tmp_path / "models" / "torch").mkdir(parents=True)
    (tmp_path / "models" / "torch" / MANIFEST).write_text("{}")
    result = run_cli(["predict", str(tmp_path), "--input", "1800"])
    assert result.exit_code == 2
    assert "is a run directory" in result.stderr and str(tmp_path / "models" / "torch") in result.stderr


@pytest.mark.parametrize("text", ["abc", "1800,", "nan"])
def test_a_bad_input_is_refused_before_any_model_loads(tmp_path, text):
    result = run_cli(["predict", str(tmp_path / "nothing-here"), "--input", text])
    assert result.exit_code == 2
    assert f"--input {text!r}" in result.stderr


def test_predict_imports_only_the_framework_its_format_needs_and_stays_quiet(exported):
    framework, directory, _ = exported
    other = {"tensorflow": "torch", "torch": "tensorflow"}[framework]
    program = (
        "import sys; from jobs.cli import cli\n"
        f"code = cli.main(['predict', {str(directory)!r}, '--input', '1,2'], standalone_mode=False)\n"
        f"assert code == 0, code\nprint({other!r} in sys.modules, {framework!r} in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1] == "False True"
    # The framework's native start-up logging stays off the terminal: one line, which model.
    assert [line.split(" ")[0] for line in shown.stderr.strip().splitlines()] == ["model:"], shown.stderr


def test_a_jobs_model_files_are_written_whole_and_its_record_keeps_only_where_they_are(tmp_path):
    files = {
        MANIFEST: json.dumps({"formats": {"state_dict": "state_dict.pt"}}).encode(),
        "a/b.bin": b"\x00\x01",
    }
    kept = store_job_model(tmp_path, "torch", dict(files))
    assert kept == {"path": "models/torch", "formats": ["state_dict"], "not_written": {}}
    assert (tmp_path / "models" / "torch" / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "models" / "torch" / MANIFEST).read_text())["job_id"] == "torch"
    # A re-run of the job replaces its model whole.
    store_job_model(tmp_path, "torch", {MANIFEST: b"{}"})
    assert sorted(path.name for path in (tmp_path / "models" / "torch").iterdir()) == [MANIFEST]
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["torch"]


def test_model_file_names_that_leave_the_job_directory_are_refused(tmp_path):
    kept = store_job_model(tmp_path, "torch", {"../escape.pt": b"x"})
    assert kept["path"] is None and "not a path inside" in kept["error"]
    assert not (tmp_path / "escape.pt").exists() and not (tmp_path / "models" / "torch").exists()


def test_save_models_flag_set_and_spec_key_mean_the_same(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("defaults: {save_models: true}\ngrid: {framework: [torch]}\n")
    configs = []
    for arguments in (
        ["--framework", "torch", "--save-models"],
        ["--framework", "torch", "--set", "save_models=true"],
        [str(spec)],
    ):
        result = run_cli(["submit", *arguments, "--dry-run", "--json"])
        assert result.exit_code == 0, result.stderr
        configs.append(json.loads(result.stdout)[0]["config"])
    assert all(config["save_models"] is True for config in configs)
    assert configs[0] == configs[1] == configs[2]
    default = json.loads(run_cli(["submit", "--framework", "torch", "--dry-run", "--json"]).stdout)
    assert default[0]["config"]["save_models"] is False
    bad = run_cli(["submit", "--set", "save_models=maybe", "--dry-run"])
    assert bad.exit_code == 2 and "save_models='maybe': use true or false" in bad.stderr


@pytest.mark.slow
def test_saved_models_of_a_run_predict_what_each_job_recorded(ray_session, tmp_path):
    """Train through Ray with --save-models (standardised data, so the scaling must be folded in
    exactly; and a ddp job, whose rank 0 exports), then read every format back."""
    output = tmp_path / "run"
    arguments = ["submit", "--save-models", "--normalize", "--epochs", "200"]
    arguments += ["--variant", "single", "--variant", "ddp", "--workers", "2"]
    result = run_cli(arguments, output)
    assert result.exit_code == 0, result.stderr
    report = result.report()
    assert {job["id"] for job in report["jobs"]} == {"tensorflow", "torch", "torch-ddp"}
    for job in report["jobs"]:
        assert "model_files" not in job
        assert job["model"]["path"] == f"models/{job['id']}"
        assert job["model"]["formats"] == formats_of(job["framework"])
        model_directory = output / job["model"]["path"]
        assert json.loads((model_directory / MANIFEST).read_text())["job_id"] == job["id"]
        recorded = job["predictions"][0]
        assert recorded["input"] == [1800.0]
        for name in job["model"]["formats"]:
            (prediction,) = predict_json(model_directory, "--format", name, "--input", "1800")
            assert prediction["output"] == pytest.approx(recorded["output"], rel=1e-5), (job["id"], name)
    assert not [path.name for path in (output / "models").iterdir() if path.name.startswith(".")]
