"""The remote driver's marked lines: long payloads in parts, cut lines, replays (no Ray needed)."""

from __future__ import annotations

import json

from jobs.pipeline import keeping_callbacks
from jobs.plan.spec import JobSpec
from jobs.record.ledger import Ledger
from jobs.record.records import JobOutcome, empty_record
from jobs.run.progress import LineProgress
from jobs.run.remote_protocol import (
    LINE_LIMIT,
    RECORD_MARKER,
    Follower,
    MarkedLines,
    complete_lines,
    encode_outcome,
    marked_text,
)


def follower_keeping_in(directory, ledger) -> Follower:
    callbacks = keeping_callbacks(directory, ledger, LineProgress())
    return Follower(callbacks.on_start, callbacks.on_record, callbacks.say)


def test_a_payload_longer_than_a_line_comes_back_whole_around_foreign_lines():
    payload = json.dumps({"history": list(range(300_000))})
    assert len(payload) > 2 * LINE_LIMIT
    lines = marked_text(RECORD_MARKER, payload).split("\n")[:-1]
    assert len(lines) >= 3 and all(len(line) <= LINE_LIMIT + 20 for line in lines)
    lines.insert(1, "a warning another thread printed")  # stderr shares the job's log
    reader = MarkedLines()
    results = [result for result in map(reader.feed, lines) if result is not None]
    assert results == [("", "a warning another thread printed"), (RECORD_MARKER, payload)]


def test_a_log_line_still_being_written_is_left_for_later():
    assert complete_lines("one\ntwo\nthr") == ["one", "two"]
    assert complete_lines("one\n") == ["one"]


def outcome_for(job_id: str) -> JobOutcome:
    record = empty_record(job_id, JobSpec("torch").to_record(), "succeeded", None)
    record["timings"] = {"total_s": 0.5}
    record["convergence"] = "converged"
    return JobOutcome(record, [{"rank": 0, "stdout": "trained\n", "stderr": ""}], {"model.json": b"{}"})


def test_the_follower_keeps_each_record_once_and_skips_an_unreadable_line(tmp_path, capsys):
    with Ledger.open(tmp_path, for_writing=True) as ledger:
        ledger.add_jobs([("a", JobSpec("torch").to_record()), ("b", JobSpec("torch").to_record())])
        follower = follower_keeping_in(tmp_path, ledger)
        text = marked_text(RECORD_MARKER, encode_outcome(outcome_for("a")))
        follower.chunk(text[:10])  # a stream chunk can end mid-line
        follower.chunk(text[10:])
        follower.chunk(text)  # replayed from the whole log: not kept twice
        follower.chunk(RECORD_MARKER + '{"id": "b", "stat\n')  # cut short
        states = {job.id: job.status for job in ledger.jobs()}
    assert follower.kept == 1 and states == {"a": "succeeded", "b": "pending"}
    # The output and model files came beside the record, and are kept as files.
    assert (tmp_path / "logs" / "a.out").read_text() == "trained\n"
    assert (tmp_path / "models" / "a" / "model.json").is_file()
    assert "skipped an unreadable runjobs-record line" in capsys.readouterr().err


def test_replaying_a_log_counts_each_start_once(tmp_path):
    from jobs.run.remote_protocol import STARTED_MARKER

    with Ledger.open(tmp_path, for_writing=True) as ledger:
        ledger.add_jobs([("a", JobSpec("torch").to_record())])
        follower = follower_keeping_in(tmp_path, ledger)
        log = marked_text(STARTED_MARKER, "a")
        follower.chunk(log)
        # The stream closed without the end marker: the whole log is read again.
        follower.replay(complete_lines(log), count_starts=False)
        (job,) = ledger.jobs()
    assert job.status == "running" and job.attempts == 1
