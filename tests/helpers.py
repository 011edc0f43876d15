"""Helpers the tests share: running the CLI in-process, strict JSON, free ports."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

from click.testing import CliRunner

from jobs.cli import cli

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
RAY = str(Path(sys.executable).with_name("ray"))


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str, output_dir: Path | None):
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.output_dir = output_dir

    def report(self) -> dict:
        return load_strict_json(self.output_dir / "report.json")


def run_cli(args: list[str], output_dir: Path | None = None) -> CliResult:
    """Run `runjobs ARGS` in this process, as a user would type it."""
    full_args = [*args, "--output", str(output_dir)] if output_dir is not None else list(args)
    result = CliRunner().invoke(cli, full_args, catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr, output_dir)


def run_cli_process(args: list[str], output_dir: Path | None = None, env: dict | None = None) -> CliResult:
    """Run `runjobs ARGS` as its own process: for what must not see this process's Ray session."""
    import os
    import subprocess

    full_args = [*args, "--output", str(output_dir)] if output_dir is not None else list(args)
    completed = subprocess.run(
        [RUNJOBS, *full_args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr, output_dir)


def load_strict_json(path: Path) -> dict:
    """Load JSON, refusing NaN and Infinity, which strict JSON readers reject."""

    def refuse(constant):
        raise AssertionError(f"{path} holds the non-JSON number {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def ray_is_running() -> bool:
    """Whether this process has started or joined Ray (False where Ray was never imported)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ledger_state(output_dir: Path, job_id: str) -> str | None:
    """A job's state in a run's ledger, read as any SQLite client would; None before it exists."""
    rows = _ledger_rows(output_dir, "SELECT status FROM jobs WHERE id = ?", (job_id,))
    return rows[0][0] if rows else None


def ledger_states(output_dir: Path) -> list[str]:
    """Every job's state in a run's ledger, in job order; [] before the ledger exists."""
    return [row[0] for row in _ledger_rows(output_dir, "SELECT status FROM jobs ORDER BY position")]


def _ledger_rows(output_dir: Path, query: str, parameters: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on a run's ledger; none before it (or its schema) exists."""
    import sqlite3

    path = output_dir / "ledger.sqlite"
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(query, parameters).fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return []
    finally:
        connection.close()


def stop_process(process) -> None:
    """End a process this test spawned in its own session: SIGTERM, then its group SIGKILLed after 30 s."""
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def started_like_a_scheduler(args: list[str], capture_stdout: bool = False):
    """`runjobs ARGS` started as cron or a batch script starts it (`runjobs ... &` from a
    non-interactive shell): SIGINT ignored, inherited by the driver, so only `runjobs
    cancel` can stop it. Killed at the end of the block if it still runs."""
    import signal
    import subprocess

    process = subprocess.Popen(
        [RUNJOBS, *args], stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_cli_in_background(args: list[str], output_dir: Path):
    """Run `runjobs ARGS` on a thread of this process; returns (thread, results dict)."""
    import threading

    results: dict[str, CliResult] = {}
    runner = threading.Thread(target=lambda: results.update(run=run_cli(args, output_dir)))
    runner.start()
    return runner, results


def sigkill_driver_once_succeeded(
    command: list[str], output_dir: Path, succeeded: int, limit_s: float, poll_s: float = 0.1
) -> dict[str, dict]:
    """Start a driver (`runjobs submit ...` into output_dir), SIGKILL it once its ledger holds
    `succeeded` succeeded jobs, and return the records those jobs had at that moment."""
    import os
    import signal
    import subprocess
    import time

    from jobs.record.ledger import Ledger

    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + limit_s
        while True:
            done = 0
            if (output_dir / "ledger.sqlite").exists():
                with Ledger.open(output_dir, for_writing=False) as ledger:
                    done = ledger.counts()["succeeded"]
            if done >= succeeded:
                break
            assert driver.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(poll_s)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    with Ledger.open(output_dir, for_writing=False) as ledger:
        return {job.id: job.record for job in ledger.jobs() if job.status == "succeeded"}


def kill_actor_once_training(name: str, settle_s: float, limit_s: float = 120) -> None:
    """Wait for the named Ray actor, give it `settle_s` to get into training, kill it."""
    import time

    import ray

    deadline = time.monotonic() + limit_s
    while True:
        assert time.monotonic() < deadline, f"actor {name} never started"
        try:
            victim = ray.get_actor(name)
            break
        except ValueError:
            time.sleep(0.2)
    time.sleep(settle_s)  # past process start and the framework import, into training
    ray.kill(victim, no_restart=True)


class RayNode:
    """A `ray start --block` process this test owns: a head, or a worker joining one.

    Ended by terminating the process it spawned (which stops its raylet and children),
    never by `ray stop`. `env` adds variables; the venv's bin goes first on PATH so a Ray
    Job's `python` entrypoint is this interpreter.
    """

    temp_dir: str | None = None  # a head's own --temp-dir, removed when it stops

    def __init__(self, log_path: Path, args: list[str], ready_text: str, env: dict | None = None):
        import os
        import subprocess

        self.log_path = log_path
        environment = {**os.environ, **(env or {})}
        environment["PATH"] = f"{Path(sys.executable).parent}:{environment.get('PATH', '')}"
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                # The dashboard agent's HTTP port is fixed (52365) by default: two nodes on
                # one machine would fight over it and the Jobs API would find no agent.
                [RAY, "start", *args, "--dashboard-agent-listen-port", str(free_port()),
                 "--disable-usage-stats", "--block"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment,
            )  # fmt: skip
        self.wait_for(ready_text)

    @classmethod
    def head(cls, log_path: Path, port: int, *args: str, env: dict | None = None) -> RayNode:
        import tempfile

        # A head of its own temp dir: Ray Jobs' supervisor finds "its" cluster through
        # TEMP_DIR/ray_current_cluster, which every head sharing /tmp/ray overwrites, so
        # with two heads alive (or one gone) a Ray Job would connect to the wrong one.
        # Short, under /tmp: Ray's socket paths must fit in 107 characters.
        temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
        try:
            node = cls(
                log_path,
                ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", temp_dir,
                 *args],
                "Ray runtime started",
                env,
            )  # fmt: skip
        except BaseException:
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        node.temp_dir = temp_dir
        return node

    @classmethod
    def worker(cls, log_path: Path, head_address: str, *args: str) -> RayNode:
        from jobs.run.authentication import wants_token

        # A node joining a cluster with token auth must present the token too; one
        # joining a cluster without it must not.
        mode = "token" if wants_token(head_address, token=None) else "disabled"
        return cls(
            log_path,
            ["--address", head_address, "--node-ip-address", "127.0.0.1", *args],
            "Ray runtime started",
            {"RAY_AUTH_MODE": mode},
        )

    def wait_for(self, text: str, limit_s: float = 90) -> None:
        import time

        deadline = time.monotonic() + limit_s
        while text not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ray start did not come up:\n{self.log_path.read_text()}")
            time.sleep(0.5)

    def crash(self) -> None:
        """The node dies at once (a lost machine, a preempted VM): SIGKILL to its process group.

        A SIGTERM would drain the node instead, letting its running tasks finish for up
        to 30 s before it leaves.
        """
        import os
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)
        if self.temp_dir:
            import shutil

            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


@contextlib.contextmanager
def running_head(log_directory: Path, *args: str):
    """A `ray start --head` on a free loopback port with `args`, for the block; yields its GCS
    address and ends it by terminating the process it spawned (which stops its children)."""
    port = free_port()
    head = RayNode.head(log_directory / "ray-start.log", port, *args)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        head.stop()


def wait_for_http(url: str, limit_s: float = 90) -> None:
    """Until `url` answers (any HTTP status), within limit_s."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered") from None
            time.sleep(0.5)
