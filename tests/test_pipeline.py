"""The submit pipeline over an executor, run for real in this process (no Ray): plan, ledger, run, report.

The in-process executor trains each job with the real framework in this process, so
these tests check what the pipeline does around the run (ledger, kept logs, reports,
re-runs, cancel) in seconds.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from jobs.pipeline import submit
from jobs.plan.planning import SubmitRequest
from jobs.plan.spec import Overrides
from jobs.record.ledger import CANCEL_OUTCOME, Ledger, request_cancel
from jobs.run.driver import RunInterrupted
from jobs.run.in_process import InProcessExecutor
from jobs.run.progress import LineProgress
from tests.helpers import load_strict_json


def torch_request(output, **fields) -> SubmitRequest:
    return SubmitRequest(
        frameworks=("torch",), overrides=Overrides(common={"epochs": 20, **fields}), output=output
    )


class Quiet(LineProgress):
    def say(self, message: str) -> None:
        pass


class NoCluster:
    """An executor that must not be used: connecting to it fails the test."""

    @contextmanager
    def connect(self):
        raise AssertionError("the pipeline connected although every job had its result")
        yield

    def closed(self):
        return None


def test_a_run_keeps_its_record_logs_and_report_and_a_rerun_needs_no_cluster(tmp_path, capsys):
    output = tmp_path / "run"
    # The job's output is captured at the file-descriptor level, as in a Ray worker:
    # pytest's own sys.stdout would bypass fd 1.
    with capsys.disabled():
        outcome = submit(torch_request(output), Quiet(), executor=InProcessExecutor())
    assert outcome.exit_code == 0 and outcome.ran == 1
    (job,) = load_strict_json(output / "report.json")["jobs"]
    assert job["status"] == "succeeded" and job["params"]["weights"] and job["timings"]["total_s"] > 0
    assert "runjobs: torch single job" in (output / "logs" / "torch.out").read_text()
    with Ledger.open(output, for_writing=False) as ledger:
        assert [(row.id, row.status, row.attempts) for row in ledger.jobs()] == [("torch", "succeeded", 1)]

    again = submit(torch_request(output), LineProgress(), executor=NoCluster())
    assert again.ran == 0 and again.exit_code == 0


class CancelAfterFirstStart(LineProgress):
    """Asks for a cancel through the ledger, as `runjobs cancel` does, once the first job starts."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def started(self, job_id: str) -> None:
        if not self.counts["succeeded"]:
            request_cancel(self.output)


def test_a_cancel_request_stops_the_run_and_records_what_it_cancelled(tmp_path):
    output = tmp_path / "run"
    sweep = tmp_path / "three.yaml"
    sweep.write_text("name: three\ndefaults: {epochs: 10}\ngrid: {framework: [torch], seed: [0, 1, 2]}\n")
    request = SubmitRequest(spec_file=sweep, output=output)
    with pytest.raises(RunInterrupted) as stopped:
        submit(request, CancelAfterFirstStart(output), executor=InProcessExecutor())
    assert stopped.value.requested and (stopped.value.running, stopped.value.pending) == (0, 2)
    with Ledger.open(output, for_writing=False) as ledger:
        assert [row.status for row in ledger.jobs()] == ["succeeded", "cancelled", "cancelled"]
        assert ledger.meta()[CANCEL_OUTCOME]["pending"] == 2
    assert load_strict_json(output / "report.json")["summary"]["cancelled"] == 2


def test_the_in_process_executor_refuses_what_needs_processes_of_its_own(tmp_path):
    request = SubmitRequest(frameworks=("torch",), variants=("ddp",), output=tmp_path / "run")
    request.overrides.common["workers"] = 2
    with pytest.raises(ValueError, match="single-device CPU jobs only"):
        submit(request, LineProgress(), executor=InProcessExecutor())
    assert not (tmp_path / "run").exists()
