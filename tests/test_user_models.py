"""User models: `model: PATH.py` or a module, checked before anything starts, trained in both frameworks.

The quick tests read, check and build user code without Ray or a framework; the slow
ones train real TensorFlow and torch models from a file in a temporary directory
through `runjobs submit`, locally on the shared embedded Ray and through Ray Jobs on a
real `ray start` head.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs.plan.planning import SubmitRequest, plan_jobs
from jobs.plan.spec import Overrides, SpecError, make_spec
from jobs.plan.sweep import sweep_job_id
from tests.helpers import RayNode, free_port, run_cli, wait_for_http
from workers.models import ModelPlan
from workers.models import user as user_models

DATA = "synthetic:rows=200,features=2,noise=0.1,seed=0,function=sine"

# A Keras model and the equivalent nn.Module: the same parameters in the same order and
# shapes (kernel [inputs, outputs] then bias, layer by layer), so a shared start makes
# them identical. The framework imports at the top would load TensorFlow and torch into
# any process that ran this file: the driver must only read it.
MODEL = """\
import keras
import torch


def build_tensorflow(features, config):
    width = config["model_args"]["width"]
    dtype = config["dtype"]
    inputs = keras.Input(shape=(features,), dtype=dtype)
    hidden = keras.layers.Dense(width, activation="tanh", dtype=dtype)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, dtype=dtype)(hidden))


def build_torch(features, config):
    width = config["model_args"]["width"]
    return torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
"""


def parameter_count(features: int, width: int) -> int:
    return features * width + width + width + 1


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def line_of(path: Path, text: str) -> int:
    """The line of `path` that holds `text`, counted from 1."""
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ---- bad files are refused before anything starts (exit 2, one line) -----------------------


BAD_FILES = {
    "syntax error": (
        "model.py",
        "def build_tensorflow(features, config):\n    return (\n\ndef build_torch(features, config): ...\n",
        "{path}:2: syntax error: '(' was never closed",
    ),
    "missing builder": (
        "model.py",
        "def build_torch(features, config):\n    return None\n",
        "{path}: no top-level build_tensorflow(features, config), which the tensorflow job(s) need",
    ),
    "builder that cannot take (features, config)": (
        "model.py",
        "def build_tensorflow(features):\n    pass\n\ndef build_torch(features, config):\n    pass\n",
        "{path}:1: build_tensorflow(features) cannot be called as build_tensorflow(features, config)",
    ),
    "missing file": (None, None, "nowhere.py: no such file (looked for {directory}/nowhere.py)"),
    "not UTF-8": (
        "model.py",
        b"# caf\xe9\n",
        "model.py: not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8",
    ),
    "not a .py file": ("model.txt", "", "model.txt: not a .py file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("how", ["options", "spec file", "dry run"])
def test_a_bad_model_file_is_one_line_and_exit_2_with_nothing_started(case, how, tmp_path, monkeypatch):
    name, content, expected = BAD_FILES[case]
    monkeypatch.chdir(tmp_path)
    model = name or "nowhere.py"
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    elif content is not None:
        (tmp_path / name).write_text(content)
    if how == "spec file":
        write(tmp_path / "sweep.yaml", f"defaults: {{model: {model}, data: '{DATA}'}}\n")
        args = ["submit", "sweep.yaml"]
    else:
        args = ["submit", "--model", model, "--data", DATA] + (["--dry-run"] if how == "dry run" else [])
    output = tmp_path / "run"
    result = run_cli(args, output)
    assert result.exit_code == 2, result.stderr
    message = expected.format(path=tmp_path / (name or ""), directory=tmp_path)
    assert result.stderr.startswith(f"runjobs: error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not output.exists(), "bad input must leave no output directory"


def test_a_module_name_is_read_without_running_the_module(tmp_path, monkeypatch):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(
        package / "wide.py",
        'raise SystemExit("runjobs ran the module")\ndef build_torch(features, config): ...\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = user_models.read_source("mymodels.wide")
    assert source.filename == str(package / "wide.py")
    assert source.digest == sha256(package / "wide.py")
    user_models.check(source, ["torch"])
    with pytest.raises(ValueError, match=r"no module mymodels.narrow importable here"):
        user_models.read_source("mymodels.narrow")


def test_a_path_is_relative_to_the_current_directory_and_expands_the_home(tmp_path, monkeypatch):
    write(tmp_path / "model.py", "def build_torch(features, config): ...\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("model.py", "./model.py", "~/model.py"):
        source = user_models.read_source(name)
        assert (source.name, source.filename) == (name, str(tmp_path / "model.py"))
    with pytest.raises(ValueError, match=r"is a directory; name the .py file in it"):
        user_models.read_source(str(tmp_path))


def test_builders_bound_at_the_top_level_in_any_form_pass_the_check(tmp_path):
    path = write(
        tmp_path / "model.py",
        """\
        try:
            from torch_models import make as build_torch
        except ImportError:
            build_torch = None
        if True:
            build_tensorflow = lambda features, config: None
        def build_jax(*arguments):
            pass
        """,
    )
    user_models.check(user_models.read_source(str(path)), ["tensorflow", "torch", "jax"])


# ---- the driver only reads user code ----------------------------------------------------------

PLANNING_PROGRAM = """
import sys
from pathlib import Path
from jobs.plan.planning import SubmitRequest, plan_jobs
from jobs.plan.spec import Overrides

overrides = Overrides()
overrides.add_assignment("model={model}")
overrides.add_assignment("model_args={{width: 3}}")
planned = plan_jobs(SubmitRequest(overrides=overrides)) + plan_jobs(SubmitRequest(spec_file=Path("{spec}")))
assert all(job.spec.for_worker().model_source.text for job in planned)
loaded = {{name.split(".")[0] for name in sys.modules}}
print(",".join(sorted(loaded & {{"tensorflow", "torch", "keras", "jax"}})))
"""


def test_planning_a_user_model_imports_no_framework(tmp_path):
    model = write(tmp_path / "model.py", MODEL)
    spec = write(tmp_path / "sweep.yaml", f"defaults: {{model: {model}, model_args: {{width: 3}}}}\n")
    program = PLANNING_PROGRAM.format(model=model, spec=spec)
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "", f"planning imported {shown.stdout.strip()}"


# ---- the model's code is part of the job's id --------------------------------------------------


def test_editing_the_model_file_changes_its_jobs_ids(tmp_path):
    model = write(tmp_path / "model.py", MODEL)
    spec = make_spec({"framework": "torch", "model": str(model), "model_args": (("width", 3),)})
    first = sweep_job_id(spec)
    model.write_text(MODEL + "# an edit\n")
    edited = sweep_job_id(spec)
    model.write_text(MODEL)
    assert first != edited
    assert sweep_job_id(spec) == first, "the same code, the same id"
    # Without a spec file, a user model's job ids carry the first digits of its digest.
    overrides = Overrides()
    overrides.add_assignment(f"model={model}")
    ids = [job.id for job in plan_jobs(SubmitRequest(overrides=overrides))]
    assert ids == [f"tensorflow-{sha256(model)[:8]}", f"torch-{sha256(model)[:8]}"]


def test_built_in_models_keep_their_ids():
    # The ids these specs had before user models existed: only a user model's code enters the hash.
    assert sweep_job_id(make_spec({"framework": "torch"})) == "torch-27db538c"
    mlp = make_spec({"framework": "tensorflow", "model": "mlp", "hidden": (8,)})
    assert sweep_job_id(mlp) == "tensorflow-8ccae9a8"


def test_the_planned_text_is_what_runs_even_if_the_file_is_edited_afterwards(tmp_path):
    model = write(tmp_path / "model.py", MODEL)
    spec_file = write(tmp_path / "sweep.yaml", f"defaults: {{model: {model}, framework: torch}}\n")
    (job,) = plan_jobs(SubmitRequest(spec_file=spec_file))
    model.write_text("def build_torch(:\n")
    shipped = job.spec.for_worker().model_source
    assert shipped.text == MODEL and shipped.digest == hashlib.sha256(MODEL.encode()).hexdigest()
    with pytest.raises(SpecError, match=rf"^{model}:1: syntax error"):
        plan_jobs(SubmitRequest(spec_file=spec_file))  # planned again: the file as it is now


# ---- building: what the builder gets, and errors that name the user's line --------------------


def plan_for(path: Path, arguments=()) -> ModelPlan:
    return ModelPlan(str(path), 2, user=user_models.read_source(str(path)), arguments=arguments)


def test_a_builder_gets_the_feature_count_and_the_jobs_fields(tmp_path):
    path = write(tmp_path / "model.py", "def build_torch(features, config):\n    return features, config\n")
    job = make_spec({"framework": "torch", "model": str(path), "dtype": "float64", "seed": 7}).for_worker()
    features, config = user_models.build(
        plan_for(path, (("width", 3), ("sizes", (8, 8)))), "torch", user_models.builder_config(job)
    )
    assert features == 2
    assert config == {
        "dtype": "float64",
        "seed": 7,
        "normalize": False,
        "model_args": {"width": 3, "sizes": [8, 8]},
    }


def test_a_builder_that_raises_names_the_deepest_line_of_the_users_file(tmp_path):
    path = write(
        tmp_path / "model.py",
        """\
        def width(config):
            return config["model_args"]["width"] + "wide"

        def build_torch(features, config):
            return width(config)
        """,
    )
    with pytest.raises(ValueError) as raised:
        user_models.build(plan_for(path, (("width", 3),)), "torch", {})
    assert str(raised.value).startswith(f"{path}:2: build_torch raised TypeError: unsupported operand")
    assert isinstance(raised.value.__cause__, TypeError), "the user's own error and traceback are kept"


def test_code_that_fails_when_the_file_runs_names_its_line(tmp_path):
    path = write(tmp_path / "model.py", "import math\nimport no_such_package\ndef build_torch(f, c): ...\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: running the model file raised ModuleNotFoundError"):
        user_models.build(plan_for(path), "torch", {})


def test_wrong_returns_and_output_shapes_are_named_with_the_file(tmp_path):
    path = write(tmp_path / "model.py", "\n\ndef build_torch(features, config):\n    return []\n")
    source = user_models.read_source(str(path))
    error = user_models.wrong_return(source, "torch", [], "an nn.Module")
    assert str(error) == (
        f"{path}:3: build_torch returned builtins.list, not an nn.Module; return a torch.nn.Module"
    )
    for shape in [(5,), (5, 1)]:
        user_models.check_output_shape(source, "torch", shape, 5)
    for shape in [(5, 3), (15,), (5, 1, 1)]:
        with pytest.raises(ValueError, match="runjobs trains one output per row"):
            user_models.check_output_shape(source, "torch", shape, 5)
    with pytest.raises(ValueError) as raised:
        user_models.check_output_shape(source, "torch", (5, 3), 5)
    assert str(raised.value) == (
        f"{path}: build_torch's model returns shape (5, 3) for 5 rows; "
        "runjobs trains one output per row, shape (5, 1) or (5,)"
    )


# ---- end to end, on real frameworks ------------------------------------------------------------


def records_by_framework(result) -> dict:
    return {job["framework"]: job for job in result.report()["jobs"]}


@pytest.mark.slow
def test_a_user_model_from_a_spec_file_trains_identically_in_both_frameworks(ray_session, tmp_path):
    model = write(tmp_path / "model.py", MODEL)
    spec = write(
        tmp_path / "compare.yaml",
        f"""\
        name: mine
        defaults: {{model: {model}, model_args: {{width: 3}}, init: shared, data: '{DATA}', epochs: 20}}
        grid: {{framework: [tensorflow, torch]}}
        """,
    )
    result = run_cli(["submit", str(spec)], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    jobs = records_by_framework(result)
    assert set(jobs) == {"tensorflow", "torch"}
    for job in jobs.values():
        assert job["status"] == "succeeded", job["error"]
        assert job["config"]["model_args"] == {"width": 3}
        assert job["model"]["digest"] == sha256(model)
        assert job["model"]["parameters"] == parameter_count(2, 3)
    first = [jobs[name]["loss"]["history"][0] for name in ("tensorflow", "torch")]
    assert first[0] == pytest.approx(first[1], rel=1e-6)


@pytest.mark.slow
def test_editing_the_model_runs_its_job_again_in_the_same_directory(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = write(tmp_path / "model.py", MODEL)
    args = ["submit", "--framework", "torch", "--model", "model.py", "--set", "model_args={width: 5}"]
    args += ["--data", DATA, "--epochs", "10"]
    first = run_cli(args, tmp_path / "run")
    assert first.exit_code == 0, first.stderr
    (job,) = first.report()["jobs"]
    assert job["id"] == f"torch-{sha256(model)[:8]}" and job["status"] == "succeeded"
    assert job["model"]["parameters"] == parameter_count(2, 5)

    again = run_cli(args, tmp_path / "run")
    assert again.exit_code == 0 and "nothing to run" in again.stderr

    model.write_text(MODEL.replace("torch.nn.Tanh()", "torch.nn.ReLU()"))
    edited = run_cli(args, tmp_path / "run")
    assert edited.exit_code == 0, edited.stderr
    (job,) = edited.report()["jobs"]
    assert job["id"] == f"torch-{sha256(model)[:8]}" and job["status"] == "succeeded"


@pytest.mark.slow
def test_a_builder_that_raises_fails_its_job_with_the_users_line_and_the_run_goes_on(ray_session, tmp_path):
    model = write(
        tmp_path / "model.py",
        MODEL.replace(
            'def build_torch(features, config):\n    width = config["model_args"]["width"]',
            'def build_torch(features, config):\n    width = config["model_args"]["width"] + "wide"',
        ),
    )
    args = [
        "submit",
        "--model",
        str(model),
        "--set",
        "model_args={width: 3}",
        "--data",
        DATA,
        "--epochs",
        "10",
    ]
    result = run_cli(args, tmp_path / "run")
    assert result.exit_code == 1, "a failed job exits 1"
    jobs = records_by_framework(result)
    assert jobs["tensorflow"]["status"] == "succeeded"
    assert jobs["torch"]["status"] == "failed"
    line = line_of(model, '"wide"')
    assert f"{model}:{line}: build_torch raised TypeError: unsupported operand" in jobs["torch"]["error"]


# Needs the frameworks to call user_models.check_output_shape after building a user model
# (the lead adds it to workers/frameworks/torch.py and tensorflow.py): until then each job
# fails with its framework's own broadcasting error, and this test fails on the message.
@pytest.mark.slow
def test_a_model_with_more_than_one_output_per_row_fails_its_jobs_clearly(ray_session, tmp_path):
    model = write(
        tmp_path / "model.py",
        MODEL.replace("keras.layers.Dense(1,", "keras.layers.Dense(3,").replace(
            "torch.nn.Linear(width, 1)", "torch.nn.Linear(width, 3)"
        ),
    )
    args = [
        "submit",
        "--model",
        str(model),
        "--set",
        "model_args={width: 3}",
        "--data",
        DATA,
        "--epochs",
        "5",
    ]
    result = run_cli(args, tmp_path / "run")
    assert result.exit_code == 1
    for framework, job in records_by_framework(result).items():
        assert job["status"] == "failed"
        assert f"build_{framework}'s model returns shape" in job["error"], job["error"]
        assert "runjobs trains one output per row" in job["error"]


@pytest.mark.slow
def test_a_user_model_from_a_temporary_directory_runs_through_ray_jobs(tmp_path, monkeypatch):
    port, dashboard_port = free_port(), free_port()
    head = RayNode.head(
        tmp_path / "ray-start.log", port, "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
        "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_http(f"{address}/api/version")
        # A relative path: the remote driver runs in its own working_dir, where no model.py
        # exists, so the job can only succeed with the code shipped from here.
        monkeypatch.chdir(tmp_path)
        model = write(tmp_path / "model.py", MODEL)
        args = ["submit", "--address", address, "--framework", "torch", "--model", "model.py"]
        args += ["--set", "model_args={width: 4}", "--data", DATA, "--epochs", "10", "--json"]
        result = run_cli(args, tmp_path / "run")
    finally:
        head.stop()
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["succeeded"] == 1
    (job,) = result.report()["jobs"]
    assert job["status"] == "succeeded", job["error"]
    assert job["model"]["digest"] == sha256(model)
    assert job["model"]["parameters"] == parameter_count(2, 4)
