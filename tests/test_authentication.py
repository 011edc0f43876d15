"""Token authentication per cluster: a token is presented to the clusters that want one, and only to them.

Against real `ray start --head` processes on loopback, one with token authentication
and one without, and a client whose token comes from a file or RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import RUNJOBS, RayNode, free_port, load_strict_json

pytestmark = pytest.mark.slow

TOKEN = "0123456789abcdef0123456789abcdef"


def start_head(directory, mode: str) -> tuple[RayNode, str]:
    port = free_port()
    env = {"RAY_AUTH_MODE": mode, **({"RAY_AUTH_TOKEN": TOKEN} if mode == "token" else {})}
    head = RayNode.head(
        directory / f"ray-{mode}.log", port, "--num-cpus", "1", "--num-gpus", "0",
        "--include-dashboard", "false", env=env,
    )  # fmt: skip
    return head, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    directory = tmp_path_factory.mktemp("auth-heads")
    started = []
    try:
        for mode in ("disabled", "token"):
            started.append(start_head(directory, mode))
        yield {"disabled": started[0][1], "token": started[1][1]}
    finally:
        for head, _ in started:
            head.stop()


def client_environment(tmp_path, token: str | None, via: str = "file") -> dict[str, str]:
    """The environment of a client whose only token is `token`, in a file or in RAY_AUTH_TOKEN."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    token_file = tmp_path / "auth_token"
    if token is not None and via == "file":
        token_file.write_text(token)
    if token is not None and via == "variable":
        environment["RAY_AUTH_TOKEN"] = token
    environment["RAY_AUTH_TOKEN_PATH"] = str(token_file)  # never this machine's own ~/.ray/auth_token
    return environment


def submit(address: str, output, environment) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUNJOBS, "submit", "--address", address, "--framework", "torch", "--epochs", "20",
         "--output", str(output)],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip


def test_a_token_on_this_machine_is_not_sent_to_a_cluster_without_token_authentication(heads, tmp_path):
    result = submit(heads["disabled"], tmp_path / "run", client_environment(tmp_path, TOKEN))
    assert result.returncode == 0, result.stderr
    (job,) = load_strict_json(tmp_path / "run" / "report.json")["jobs"]
    assert job["status"] == "succeeded"


def test_the_token_is_presented_to_a_cluster_that_wants_it(heads, tmp_path):
    result = submit(heads["token"], tmp_path / "run", client_environment(tmp_path, TOKEN, via="variable"))
    assert result.returncode == 0, result.stderr
    (job,) = load_strict_json(tmp_path / "run" / "report.json")["jobs"]
    assert job["status"] == "succeeded"


@pytest.mark.parametrize(
    "token, expected",
    [(None, "uses token authentication and this machine has no token"), ("f" * 32, "refuses the token")],
    ids=["no-token", "wrong-token"],
)
def test_a_cluster_that_wants_a_token_the_client_lacks_is_one_line_and_exit_2(
    heads, tmp_path, token, expected
):
    result = submit(heads["token"], tmp_path / "run", client_environment(tmp_path, token))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert expected in line and "RAY_AUTH_TOKEN" in line and "auth_token" in line
    assert not (tmp_path / "run").exists()
