"""Bad input through the CLI: one line on stderr, exit 2, nothing started, nothing written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, ray_is_running, run_cli, run_cli_process
from workers.export import MANIFEST

EXAMPLES = Path(__file__).parent.parent / "examples"


def assert_refused(result, expected: str | tuple[str, ...], exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runjobs: error: ")
    for words in (expected,) if isinstance(expected, str) else expected:
        assert words in lines[0]
    assert "Traceback" not in result.stderr
    if result.output_dir is not None:
        assert not result.output_dir.exists(), "a refused run must leave no output directory"


@pytest.fixture
def bad_csv(tmp_path):
    def write(name: str, content: str):
        path = tmp_path / name
        path.write_text(content)
        return path

    return write


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--framework", "mxnet"], "'mxnet' is not one of 'tensorflow', 'torch', 'jax'"),
        (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'adam', 'sgd'"),
        (["--epochs", "0"], "epochs=0: must be a whole number >= 1"),
        (["--epochs", "-3"], "epochs=-3"),
        (["--lr", "0"], "lr=0.0: must be a finite number > 0"),
        (["--lr", "-0.1"], "lr=-0.1"),
        (["--lr", "nan"], "lr=nan"),
        (["--lr", "inf"], "lr=inf"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--init", "glorot"], "init='glorot'"),
        (["--set", "learning_rate=1"], "unknown job field 'learning_rate'"),
        (["--predict", "1800,3"], "predict 1800,3 has 2 value(s) but the data has 1 feature(s)"),
        (["--data", "synthetic:rows=1"], "need at least 2 rows"),
        (["--framework", "tensorflow", "--variant", "ddp"], "variant ddp is not for tensorflow"),
        (
            ["--framework", "torch", "--set", "variant=mirrored"],
            "variant='mirrored' is for tensorflow, not torch",
        ),
        (["--variant", "ddp", "--workers", "0"], "workers=0: must be a whole number >= 1"),
        (["--workers", "2"], "the single variant runs exactly 1 worker"),
        (
            ["--variant", "ddp", "--workers", "2", "--gpus-per-job", "4"],
            "multiworker and ddp workers use at most 1 GPU",
        ),
        (
            ["--keep-warm", "10x", "--address", "127.0.0.1:1"],
            "--keep-warm '10x': give a duration such as 90s",
        ),
        (["--keep-warm", "-5", "--address", "127.0.0.1:1"], "--keep-warm '-5'"),
        (["--keep-warm", "200h", "--address", "127.0.0.1:1"], "at most 168h"),
        (["--keep-warm", "5m"], "--keep-warm keeps workers on a running cluster: give its --address"),
        (
            ["--preset", "article", "--framework", "jax"],
            "--preset article has settings for tensorflow and torch",
        ),
    ],
)
def test_bad_options_are_refused_before_anything_starts(tmp_path, args, expected):
    ray_was_running = ray_is_running()
    result = run_cli(["submit", *args], tmp_path / "run")
    assert_refused(result, expected)
    assert ray_is_running() == ray_was_running, "bad input must not start Ray"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the file is empty"),
        ("size,price\n500,100\n", "1 data row(s); fitting a line needs at least 2"),
        ("size,price\n500,100\n750,abc\n", "bad.csv:3: column 'price' holds 'abc', not a number"),
    ],
)
def test_bad_csv_data_is_refused_naming_the_file_and_line(tmp_path, bad_csv, content, expected):
    path = bad_csv("bad.csv", content)
    result = run_cli(["submit", "--data", str(path)], tmp_path / "run")
    assert_refused(result, expected)
    assert str(path) in result.stderr


def test_a_missing_csv_file_is_refused(tmp_path):
    missing = tmp_path / "nowhere.csv"
    result = run_cli(["submit", "--data", str(missing)], tmp_path / "run")
    assert_refused(result, f"{missing}: no such file")


def test_an_output_directory_that_holds_files_is_refused(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "report.json").write_text("{}")
    result = run_cli(["submit", "--output", str(output)])
    assert result.exit_code == 2
    assert "already holds files" in result.stderr
    assert (output / "report.json").read_text() == "{}", "an earlier run's result must not be touched"


@pytest.mark.slow
def test_an_unreachable_address_is_refused_within_thirty_seconds(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    # Its own process: this one may hold the suite's Ray session, which submit would use.
    result = run_cli_process(["submit", "--address", address], tmp_path / "run")
    assert time.monotonic() - started < 30
    # Exit 3, not 2: the input was fine, the cluster was not there; a scheduler may retry.
    assert_refused(result, f"no Ray cluster answers at {address}", exit_code=3)


def test_ray_address_from_the_environment_is_used(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    environment = {"RAY_ADDRESS": address, "RUNJOBS_CONNECT_TIMEOUT_S": "1"}
    result = run_cli_process(["submit"], tmp_path / "run", env=environment)
    assert_refused(result, address, exit_code=3)


# Bad input found by a hostile user: each is refused in one line, exit 2, before Ray
# starts and before any output directory exists. Where the CLI would otherwise start Ray
# the test uses --dry-run, which plans and checks everything without it.


def billion_laughs() -> str:
    """A spec of a few hundred bytes whose `name` expands to 9**9 (387 million) strings."""
    lines = ["name:", '  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, anchor in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  - &{anchor} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


def grid_of(keys: int, values: int) -> str:
    fields = ["epochs", "seed", "retries", "batch_size", "timeout_s"][:keys]
    return "grid:\n" + "".join(
        f"  {field}: [{', '.join(str(n) for n in range(1, values + 1))}]\n" for field in fields
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (billion_laughs(), ("expands to more than 1000000 values", "anchors and aliases")),
        ("name: &a [*a]\n", "the YAML refers to itself"),
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("name: a\x00b\n", "not valid YAML (unacceptable character #x0000"),
        (grid_of(5, 25), ("expands to 19531250 jobs", "25 x 25 x 25 x 25 x 25", "limit of 100000",
                          "RUNJOBS_MAX_JOBS=19531250")),
        ("repeat: 1000000000\n", ("expands to 2000000000 jobs", "limit of 100000", "RUNJOBS_MAX_JOBS")),
        ("name: [1, 2]\n", "name must be text"),
        ("#" * 2**20 + "\nname: x\n", "larger than 1048576 bytes"),
        ("repeat: " + "9" * 5000 + "\n", "a value cannot be read (Exceeds the limit (4300 digits)"),
        ("name: 2017-13-45\n", "a value cannot be read (month must be in 1..12)"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep-nesting", "nul", "huge-grid", "huge-repeat", "name",
         "huge-file", "huge-integer", "bad-date"],
)  # fmt: skip
def test_a_hostile_spec_file_is_refused_in_one_line(tmp_path, content, expected):
    spec = tmp_path / "hostile.yaml"
    spec.write_text(content)
    started = time.monotonic()
    result = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert_refused(result, expected)
    assert time.monotonic() - started < 10, "refused by counting, not by expanding"


def test_the_job_limit_is_raised_with_runjobs_max_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNJOBS_MAX_JOBS", "7")
    refused = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--dry-run"], tmp_path / "run")
    assert_refused(refused, ("expands to 8 jobs", "limit of 7", "RUNJOBS_MAX_JOBS=8"))
    monkeypatch.setenv("RUNJOBS_MAX_JOBS", "8")
    allowed = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--dry-run"], tmp_path / "run")
    assert allowed.exit_code == 0, allowed.stderr
    assert "8 job(s); nothing started" in allowed.stdout


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_runjobs_max_jobs_is_refused_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv("RUNJOBS_MAX_JOBS", value)
    result = run_cli(["submit", str(EXAMPLES / "lr-seed.yaml"), "--dry-run"], tmp_path / "run")
    assert_refused(result, (f"RUNJOBS_MAX_JOBS={value!r}", "whole number of jobs >= 1"))


def test_a_spec_file_that_is_not_utf8_is_refused(tmp_path):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: café\ndefaults: {epochs: 5}\n".encode("latin-1"))
    result = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert_refused(result, (str(spec), "not UTF-8 text (byte 0xe9", "save the spec file as UTF-8"))


def test_a_spec_file_that_is_a_directory_or_a_device_is_refused(tmp_path):
    directory = tmp_path / "sweep.yaml"
    directory.mkdir()
    assert_refused(run_cli(["submit", str(directory), "--dry-run"], tmp_path / "run"), "is a directory")
    # A device reads forever (/dev/zero) or nothing (/dev/null): neither is a spec.
    assert_refused(run_cli(["submit", os.devnull, "--dry-run"], tmp_path / "run"), "is not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_an_unreadable_spec_file_is_refused(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: x\n")
    spec.chmod(0)
    result = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert_refused(result, "cannot read the spec file (Permission denied)")


def test_a_seed_beyond_what_the_frameworks_take_is_refused_at_plan_time(tmp_path):
    result = run_cli(["submit", "--seed", str(2**32), "--dry-run"], tmp_path / "run")
    assert_refused(result, ("seed=4294967296", "at most 4294967295"))
    allowed = run_cli(["submit", "--seed", str(2**32 - 1), "--dry-run"], tmp_path / "run")
    assert allowed.exit_code == 0, allowed.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "not UTF-8 text"),
        ("size,price\n500,100\n750,café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9)"),
        (b"size,price\n500,100\n750," + b"1" * 131_073 + b"\n", "bad.csv:3: a cell longer than 131072"),
        (b"x,x,y\n1,2,3\n4,5,6\n", "bad.csv:1: the header names 'x' more than once"),
        (b'size,price\n500,100\n"750,150\n', "not valid CSV (unexpected end of data)"),
        (b'size,price\n500,100\n"750"1,150\n', "bad.csv:3: not valid CSV"),
        (b"size,price\n500,100\n1_000,150\n", "bad.csv:3: column 'size' holds '1_000', not a plain number"),
    ],
    ids=["binary", "latin-1", "huge-cell", "duplicate-header", "open-quote", "bad-quote", "underscore"],
)  # fmt: skip
def test_a_hostile_csv_is_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    result = run_cli(["submit", "--data", str(path), "--dry-run"], tmp_path / "run")
    assert_refused(result, expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("synthetic:seed=-1", "synthetic seed=-1: need a whole number >= 0"),
        ("synthetic:rows=1000000000000,features=1000", ("1000000000000000 values", "limit of 100000000")),
        ("synthetic:rows=2,features=100000000", "limit of 100000000"),
    ],
)
def test_synthetic_data_that_cannot_be_made_is_refused(tmp_path, data, expected):
    result = run_cli(["submit", "--data", data, "--dry-run"], tmp_path / "run")
    assert_refused(result, expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "target=price"], "target=price: features and target name a CSV's columns"),
        (["--set", "features=size"], "features=size: features and target name a CSV's columns"),
        (["--data", "synthetic:rows=10", "--set", "target=y"], "but the data is synthetic:rows=10"),
    ],
)
def test_csv_columns_named_for_data_that_is_not_a_csv_are_refused(tmp_path, args, expected):
    result = run_cli(["submit", *args, "--dry-run"], tmp_path / "run")
    assert_refused(result, (expected, "pass --data PATH.csv"))


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf", "nan"])
def test_a_bad_connect_timeout_is_refused_naming_the_variable(tmp_path, value):
    # Its own process: a Ray session this one holds would be used whatever the address.
    environment = {"RUNJOBS_CONNECT_TIMEOUT_S": value}
    address = f"127.0.0.1:{free_port()}"
    result = run_cli_process(["submit", "--address", address], tmp_path / "run", environment)
    assert_refused(result, (f"RUNJOBS_CONNECT_TIMEOUT_S={value!r}", "number of seconds > 0"))
    dry = run_cli_process(["submit", "--dry-run", "--address", address], env=environment)
    assert dry.exit_code == 2 and "RUNJOBS_CONNECT_TIMEOUT_S" in dry.stderr


@pytest.mark.parametrize(
    "address", ["nonsense::x", "host:notaport", "127.0.0.1:99999", "myhost", "http://head:x"]
)
def test_an_address_that_cannot_be_read_is_bad_input_not_an_unreachable_cluster(tmp_path, address):
    ray_was_running = ray_is_running()
    result = run_cli(["submit", "--address", address], tmp_path / "run")
    assert_refused(result, (f"cannot read {address!r} as a Ray address", "HOST:PORT"), exit_code=2)
    assert ray_is_running() == ray_was_running


def test_an_output_directory_under_a_file_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "somefile").write_text("not a directory")
    ray_was_running = ray_is_running()
    result = run_cli(["submit"], tmp_path / "somefile" / "run")
    assert_refused(result, ("somefile is a file", "name a directory elsewhere"))
    assert ray_is_running() == ray_was_running
    assert (tmp_path / "somefile").read_text() == "not a directory"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_directory_where_nothing_can_be_created_is_refused(tmp_path):
    ray_was_running = ray_is_running()
    result = run_cli(["submit"], Path("/proc/runjobs-test/run"))
    assert_refused(result, ("--output /proc/runjobs-test/run: cannot create a directory there",))
    assert ray_is_running() == ray_was_running


def test_a_bare_runjobs_prints_its_help_and_exits_0():
    result = run_cli([])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Usage: ") and "[OPTIONS] COMMAND [ARGS]..." in result.stdout
    assert "Commands:" in result.stdout and "submit" in result.stdout
    assert result.stderr == ""


def model_directory(tmp_path, manifest: str) -> str:
    directory = tmp_path / "models" / "torch"
    directory.mkdir(parents=True)
    (directory / MANIFEST).write_text(manifest)
    return str(directory)


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ("{not json", "cannot be read as JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"formats": ["torchscript"]}', "formats must map each format to its file name"),
        ('{"formats": {"torchscript": 5}}', "formats must map each format to its file name"),
        ('{"formats": {}, "features": 5}', "features must be a list of names"),
        ('{"formats": {"state_dict": "state_dict.pt"}, "not_written": [1]}', "not_written must map"),
    ],
)
def test_a_malformed_model_json_is_one_line_and_exit_2(tmp_path, manifest, expected):
    result = run_cli(["predict", model_directory(tmp_path, manifest), "--input", "1800"])
    assert_refused(result, (expected, "export the model again"))


def test_a_malformed_model_json_beside_a_named_model_file_is_one_line(tmp_path):
    directory = model_directory(tmp_path, "{not json")
    (tmp_path / "models" / "torch" / "model.onnx").write_bytes(b"x")
    result = run_cli(["predict", f"{directory}/model.onnx", "--input", "1800"])
    assert_refused(result, "cannot be read as JSON")


@pytest.mark.parametrize("leaving", ["../outside.pt", "absolute", "symlink"])
def test_model_json_files_outside_the_model_directory_are_refused(tmp_path, leaving):
    outside = tmp_path / "models" / "outside.pt"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"a file predict must not read")
    name = {"../outside.pt": "../outside.pt", "absolute": str(outside), "symlink": "state_dict.pt"}[leaving]
    directory = model_directory(tmp_path, json.dumps({"formats": {"state_dict": name}}))
    if leaving == "symlink":
        os.symlink(outside, f"{directory}/state_dict.pt")
    result = run_cli(["predict", directory, "--input", "1800"])
    assert_refused(result, ("is outside the model directory", "export the model again"))


def test_dry_run_checks_the_output_directory_and_the_address_form_too(tmp_path):
    long_name = "a" * 300
    for args, expected in (
        (["--output", "/proc/runjobs-run"], "cannot create a directory there"),
        (["--output", str(tmp_path / long_name)], "name another directory"),
        (["--address", "nonsense::x"], "cannot read 'nonsense::x' as a Ray address"),
    ):
        ray_was_running = ray_is_running()
        result = run_cli(["submit", "--dry-run", *args])
        assert result.exit_code == 2, (args, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert ray_is_running() == ray_was_running


# Found by fuzzing (tests/test_fuzz.py, bench/fuzz.py, docs/RELIABILITY.md): each of these
# escaped as a traceback, printed its error over two lines, or started jobs that could only
# fail or break their report.


@pytest.mark.parametrize("text", ["1;2", "abc", ""])
def test_a_predict_option_that_is_not_numbers_is_one_line(tmp_path, text):
    result = run_cli(["submit", "--predict", text, "--dry-run"], tmp_path / "run")
    assert_refused(result, f"predict {text!r}: give numbers separated by commas")


def test_a_data_path_too_long_for_the_file_system_is_refused(tmp_path):
    path = tmp_path / ("a" * 300 + ".csv")
    result = run_cli(["submit", "--data", str(path), "--dry-run"], tmp_path / "run")
    assert_refused(result, ("File name too long", "pass an existing CSV to --data"))


def test_a_line_break_in_a_path_or_a_column_name_stays_on_the_error_line(tmp_path):
    result = run_cli(["submit", "--data", "a\nb.csv", "--dry-run"], tmp_path / "run")
    assert_refused(result, "a\\nb.csv: no such file")
    path = tmp_path / "data.csv"
    path.write_text('"size\x0bsqft",price\n500,100\n750,150\n')
    result = run_cli(["submit", "--data", str(path), "--set", "target=cost", "--dry-run"], tmp_path / "run")
    assert_refused(result, "no column 'cost'; the columns are size\\x0bsqft, price")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("1: 2\nfoo: 3\n", "unknown key 'foo'"),
        ("repeat: 2\ndefaults: {seed: [1]}\n", "seed=[1]: must be a whole number >= 0"),
        ("grid: {variant: [[1]]}\n", "variant=[1]: choose one of single"),
        ("jobs: [{framework: []}]\n", "framework=[]: choose one of tensorflow, torch"),
        ("grid: {framework: [tensorflow, troch]}\n", "framework='troch': choose one of tensorflow, torch"),
        (f"defaults: {{lr: {10**400}}}\n", "lr=inf: must be a finite number > 0"),
        (f"defaults: {{predict: [{10**400}]}}\n", "each input must be finite numbers"),
    ],
    ids=["mixed-key-types", "list-seed-repeated", "list-variant", "list-framework", "misspelt-framework",
         "integer-past-float", "prediction-past-float"],
)  # fmt: skip
def test_a_spec_file_value_of_the_wrong_type_or_size_is_refused_in_one_line(tmp_path, content, expected):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(content)
    result = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert_refused(result, expected)


@pytest.mark.parametrize(
    "args",
    [
        ["--batch-size", str(10**400)],  # ran, then broke the report's TensorBoard hyperparameters
        ["--variant", "ddp", "--workers", str(10**400), "--gpus-per-job", "0.5"],
        ["--epochs", str(2**63)],
    ],
    ids=["batch-size", "workers", "epochs"],
)
def test_a_whole_number_past_int64_is_refused_before_anything_starts(tmp_path, args):
    result = run_cli(["submit", *args, "--dry-run"], tmp_path / "run")
    assert_refused(result, "must be at most 9223372036854775807 (2**63 - 1)")


def test_an_initial_value_past_float32_is_refused_instead_of_failing_its_job(tmp_path):
    result = run_cli(["submit", "--init", "1e300", "--dry-run"], tmp_path / "run")
    assert_refused(result, ("init='1e300'", "float32", "use a smaller initial value"))
    allowed = run_cli(["submit", "--init", "-3.4e38", "--dry-run"], tmp_path / "run")
    assert allowed.exit_code == 0, allowed.stderr
