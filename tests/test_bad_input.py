"""Bad input through the CLI: one line on stderr, exit 2, nothing started, nothing written."""

from __future__ import annotations

import time

import pytest

from tests.helpers import free_port, ray_is_running, run_cli


def assert_refused(result, expected: str, exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runjobs: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
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
        (["--framework", "jax"], "'jax' is not one of 'tensorflow', 'torch'"),
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
    result = run_cli(["submit", "--address", address], tmp_path / "run")
    assert time.monotonic() - started < 30
    # Exit 3, not 2: the input was fine, the cluster was not there; a scheduler may retry.
    assert_refused(result, f"no Ray cluster answers at {address}", exit_code=3)


def test_ray_address_from_the_environment_is_used(tmp_path, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("RUNJOBS_CONNECT_TIMEOUT_S", "1")
    result = run_cli(["submit"], tmp_path / "run")
    assert_refused(result, address, exit_code=3)
