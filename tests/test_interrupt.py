"""Ctrl-C (or SIGTERM, as Slurm's scancel sends) during a run: running jobs are cancelled and
recorded, finished ones are kept."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.helpers import RUNJOBS, ledger_state, load_strict_json

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_a_run_keeps_finished_jobs_and_records_the_rest_cancelled(tmp_path, stop_signal):
    output = tmp_path / "run"
    # The article preset's TensorFlow job (Keras model.fit, 500 epochs) runs for several
    # seconds after the torch job has finished: interrupt in between.
    process = subprocess.Popen(
        [RUNJOBS, "submit", "--preset", "article", "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C reaches a driver at a terminal, whose SIGINT is at its default even when
        # this suite runs in the background of a non-interactive shell (SIGINT ignored,
        # and inherited): `runjobs cancel` is the way to stop such a driver.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while ledger_state(output, "torch") != "succeeded":
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the torch job never finished"
            time.sleep(0.1)
        assert ledger_state(output, "tensorflow") == "running", "TensorFlow finished first"
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    report = load_strict_json(output / "report.json")
    jobs = {job["framework"]: job for job in report["jobs"]}
    assert jobs["torch"]["status"] == "succeeded" and jobs["torch"]["params"] is not None
    assert jobs["tensorflow"]["status"] == "cancelled"
    assert report["summary"]["cancelled"] == 1


def test_with_json_only_the_summary_reaches_stdout_whatever_else_writes_to_it():
    # Ray prints its raylet's and autoscaler's notices to a driver's stdout (one ended up in
    # a Slurm job's summary file once); with --json they go to stderr instead.
    import subprocess
    import sys

    program = (
        "import os, sys\n"
        "from jobs.cli import _stdout_kept_for_json\n"
        "with _stdout_kept_for_json(True):\n"
        "    os.write(1, b'(raylet) notice\\n'); print('from python'); sys.stdout.flush()\n"
        "    os.system('echo from a child')\n"
        "print('{\"exit_code\": 130}')\n"
    )
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == '{"exit_code": 130}\n'
    assert (
        "(raylet) notice" in shown.stderr and "from a child" in shown.stderr and "from python" in shown.stderr
    )
