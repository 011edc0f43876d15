"""Early stopping, the worker's side: a job reports its loss every few epochs and stops when told.

Jobs run in this process through the task body (workers.entry.run_job), without Ray,
reporting to a real StoppingBoard through a BoardMonitor, or to a small policy that
answers stop at its k-th report. One test runs a job as a Ray task reporting to the
board as an actor. TensorFlow's tests are slow (its import and tracing); torch's and
JAX's are quick.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time

import numpy as np
import pytest

from jobs.plan.spec import make_spec
from workers import frameworks
from workers.data import load_dataset
from workers.entry import run_job
from workers.reporting import BoardMonitor, ReportSchedule, StoppingBoard
from workers.training import TrainingJob

DATA = "synthetic:rows=200,features=3,noise=0.1,seed=0,function=linear"
EPOCHS = 40
REPORT_EVERY = 10

FRAMEWORK_LOOPS = [
    pytest.param(framework, loop, id=f"{framework}-{loop}", marks=[pytest.mark.slow] if slow else [])
    for framework, slow in (("tensorflow", True), ("torch", False), ("jax", False))
    for loop in ("fast", "article")
]


def job(framework: str, loop: str, report_every: int | None = REPORT_EVERY, **fields) -> TrainingJob:
    """A small linear job in minibatches (so the shuffle's epoch numbering matters too) with a prediction."""
    spec = make_spec(
        {
            "framework": framework,
            "loop": loop,
            "epochs": EPOCHS,
            "batch_size": 64,
            "predict": ((1.0, 2.0, 3.0),),
            **fields,
        }
    )
    return dataclasses.replace(spec.for_worker(), report_every=report_every)


def train(spec: TrainingJob, monitor=None) -> dict:
    return run_job(spec, load_dataset(DATA), time.time(), monitor=monitor)


class StopAtReport:
    """A stopping policy for tests: answers stop at its `count`-th report, and keeps what it heard."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.reports: list[tuple[int, float]] = []

    def report(self, epochs_done: int, loss: float) -> bool:
        self.reports.append((epochs_done, loss))
        return len(self.reports) >= self.count


class BoardWithRule:
    """A job's BoardMonitor with the control plane's part played between its reports.

    After each report it drains the board and, once the job has reported `count` times,
    marks it to stop, as the control plane would; the job hears that at its next report.
    """

    def __init__(self, board: StoppingBoard, job_id: str, count: int) -> None:
        self.board = board
        self.monitor = BoardMonitor(board, job_id)
        self.job_id = job_id
        self.count = count
        self.heard: list[tuple[str, int, float]] = []

    def report(self, epochs_done: int, loss: float) -> bool:
        answer = self.monitor.report(epochs_done, loss)
        self.heard += self.board.drain()
        if len(self.heard) >= self.count:
            self.board.stop([self.job_id])
        return answer


# ---- the board and the schedule, without a framework ---------------------------------------------


def test_the_board_answers_stop_only_to_the_jobs_told_and_drains_reports_in_arrival_order():
    board = StoppingBoard()
    assert board.report("a", 10, 0.5) is False
    assert board.report("b", 10, 0.7) is False
    board.stop(["b"])
    assert board.report("a", 20, 0.25) is False
    assert board.report("b", 20, 0.6) is True
    assert board.drain() == [("a", 10, 0.5), ("b", 10, 0.7), ("a", 20, 0.25), ("b", 20, 0.6)]
    assert board.drain() == [], "a drain returns only what arrived since the last one"

    board.forget("b")
    assert board.report("b", 10, 0.7) is False, "a forgotten job (say, a retry) starts unmarked"


def test_a_board_monitor_reports_under_its_job_id_and_survives_pickling():
    board = StoppingBoard()
    monitor = BoardMonitor(board, "job-1")
    assert monitor.report(10, np.float32(0.5)) is False
    board.stop(["job-1"])
    assert monitor.report(20, 0.25) is True
    assert board.drain() == [("job-1", 10, 0.5), ("job-1", 20, 0.25)]

    copy = pickle.loads(pickle.dumps(monitor))
    assert copy.job_id == "job-1" and isinstance(copy.board, StoppingBoard)


def test_the_schedule_cuts_the_epochs_into_chunks_only_when_there_is_someone_to_report_to():
    policy = StopAtReport(99)
    assert ReportSchedule(40, 10, policy).chunks() == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert ReportSchedule(45, 10, policy).chunks()[-2:] == [(30, 40), (40, 45)], "the last chunk is shorter"
    assert ReportSchedule(5, 10, policy).chunks() == [(0, 5)], "a job shorter than a chunk reports at its end"
    assert ReportSchedule(40, None, policy).chunks() == [(0, 40)]
    assert ReportSchedule(40, 10, None).chunks() == [(0, 40)], "without a monitor the loop runs whole"
    with pytest.raises(ValueError, match="report_every=0"):
        ReportSchedule(40, 0, policy)


def test_a_stop_at_the_last_report_is_not_an_early_stop():
    schedule = ReportSchedule(40, 10, StopAtReport(4))
    assert [schedule.stop_after(last, 1.0) for _, last in schedule.chunks()] == [False] * 4
    assert schedule.stopped_at_epoch is None


# ---- jobs that report ------------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "loop"), FRAMEWORK_LOOPS)
def test_reports_arrive_every_n_epochs_with_that_epochs_loss(framework, loop):
    board = StoppingBoard()
    result = train(job(framework, loop), BoardMonitor(board, "job-1"))

    reports = board.drain()
    history = result["loss"]["history"]
    assert [(job_id, epochs) for job_id, epochs, _ in reports] == [("job-1", n) for n in (10, 20, 30, 40)]
    assert [loss for _, _, loss in reports] == [history[epochs - 1] for _, epochs, _ in reports]
    assert "stopped" not in result


@pytest.mark.parametrize(("framework", "loop"), FRAMEWORK_LOOPS)
def test_reporting_without_a_stop_trains_exactly_what_the_whole_run_trains(framework, loop):
    whole = train(job(framework, loop, report_every=None))
    reported = train(job(framework, loop), StopAtReport(99))

    # Bit-identical: the chunks run the same compiled loop on the same state, epoch by epoch.
    for part in ("params", "predictions"):
        assert reported[part] == whole[part]
    assert reported["loss"] == whole["loss"]
    assert reported["history"]["weights"] == whole["history"]["weights"]
    assert reported["convergence"] == whole["convergence"]


@pytest.mark.parametrize(("framework", "loop"), FRAMEWORK_LOOPS)
def test_a_job_told_to_stop_at_its_second_report_keeps_twenty_epochs_and_a_whole_result(framework, loop):
    policy = StopAtReport(2)
    stopped = train(job(framework, loop), policy)
    whole = train(job(framework, loop, report_every=None))

    assert [epochs for epochs, _ in policy.reports] == [10, 20]
    assert stopped["stopped"] == {"epochs": 20, "of": 40}
    assert len(stopped["loss"]["history"]) == 20
    assert len(stopped["history"]["epoch_s"]) == 20
    assert len(stopped["history"]["weights"]) == len(stopped["history"]["bias"]) == 20
    # What it trained is the whole run's first 20 epochs, and its result is judged on those.
    assert stopped["loss"]["history"] == whole["loss"]["history"][:20]
    assert stopped["history"]["weights"] == whole["history"]["weights"][:20]
    np.testing.assert_allclose(stopped["params"]["weights"], stopped["history"]["weights"][-1], rtol=1e-12)
    np.testing.assert_allclose(stopped["params"]["bias"], stopped["history"]["bias"][-1], rtol=1e-12)
    assert stopped["loss"]["final"] != whole["loss"]["final"]
    assert np.isfinite(stopped["loss"]["final"]) and stopped["loss"]["r2_gap"] is not None
    assert stopped["convergence"] in ("converged", "not_converged", "diverged")
    assert len(stopped["predictions"]) == 1 and np.isfinite(stopped["predictions"][0]["output"])
    assert stopped["timings"]["epoch_s_median"] is not None
    json.dumps(stopped, allow_nan=False)  # a record: plain JSON


@pytest.mark.parametrize("framework", ["torch", "jax", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_a_stop_marked_on_the_board_is_heard_at_the_jobs_next_report(framework):
    board = StoppingBoard()
    policy = BoardWithRule(board, "job-1", count=1)  # marks the stop after the first report
    result = train(job(framework, "fast"), policy)

    assert [epochs for _, epochs, _ in policy.heard] == [10, 20]
    assert result["stopped"] == {"epochs": 20, "of": 40}


def test_a_job_that_trains_beyond_the_line_stops_too():
    policy = StopAtReport(1)
    result = train(job("torch", "fast", model="mlp", hidden=(8,)), policy)
    assert result["stopped"] == {"epochs": 10, "of": 40}
    assert len(result["loss"]["history"]) == 10
    assert result["params"]["count"] > 0 and np.isfinite(result["loss"]["final"])


def test_a_reporting_job_reuses_the_warm_workers_compiled_jax_loop():
    framework = frameworks.get("jax")
    train(job("jax", "fast", report_every=None))
    compiled = framework.compilations
    result = train(job("jax", "fast", lr=0.05, seed=3), StopAtReport(3))
    assert framework.compilations == compiled, "the chunks should run the loop the last job compiled"
    assert result["stopped"] == {"epochs": 30, "of": 40}


@pytest.mark.slow
def test_a_reporting_job_reuses_the_warm_workers_traced_tensorflow_loop():
    framework = frameworks.get("tensorflow")
    train(job("tensorflow", "fast", report_every=None))
    traced = framework.traced_loop
    result = train(job("tensorflow", "fast", lr=0.05, seed=3), StopAtReport(3))
    assert framework.traced_loop is traced, "the chunks should run the loop the last job traced"
    assert result["stopped"] == {"epochs": 30, "of": 40}


@pytest.mark.slow
def test_a_ray_task_reports_to_the_board_actor_and_stops_when_marked(ray_session):
    ray = ray_session
    board = ray.remote(StoppingBoard).remote()
    ray.get(board.stop.remote(["job-1"]))  # decided before the first report: it stops there
    task = ray.remote(run_job).remote(
        job("torch", "fast"), load_dataset(DATA), time.time(), monitor=BoardMonitor(board, "job-1")
    )
    result = ray.get(task, timeout=120)

    assert result["stopped"] == {"epochs": 10, "of": 40}
    assert ray.get(board.drain.remote()) == [("job-1", 10, result["loss"]["history"][-1])]
    ray.kill(board)
