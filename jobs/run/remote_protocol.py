"""The wire protocol of a remote run: marked lines in the Ray Job's output, and what reads them.

The remote driver (jobs/run/remote_entry.py) prints the plan, each job's start, each
ended job's whole record (logs and model files as base64) and its end as marked lines;
everything else in its output is its own messages. A payload longer than LINE_LIMIT goes
out as PART lines followed by its marked line: Ray's log stream is a websocket whose
messages aiohttp caps at 4 MiB. The client (jobs/run/ray_jobs.py) feeds the lines it
reads to a Follower, which hands starts and records to its callbacks.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any

from jobs.record.records import JobOutcome

# Marked lines in the remote driver's output; everything else is its own messages.
PLAN_MARKER = "runjobs-plan "
STARTED_MARKER = "runjobs-started "
RECORD_MARKER = "runjobs-record "
END_MARKER = "runjobs-end "
# An adaptive search's trial, asked on the head: its number, values and job.
TRIAL_MARKER = "runjobs-trial "
# A payload longer than LINE_LIMIT goes out as PART lines followed by its marked line
# (the rest): Ray's log stream is a websocket whose messages aiohttp caps at 4 MiB.
PART_MARKER = "runjobs-part "
LINE_LIMIT = 512 * 1024
# Ray's own INFO lines in a job's log ("2026-11-25 09:50:50,528\tINFO job_manager.py:581 -- ...").
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO)\s")


def marked_text(marker: str, payload: str) -> str:
    """The lines that carry `payload` under `marker`, newline-terminated, for one write."""
    parts = [payload[start : start + LINE_LIMIT] for start in range(0, len(payload), LINE_LIMIT)] or [""]
    return "".join(f"{PART_MARKER}{part}\n" for part in parts[:-1]) + f"{marker}{parts[-1]}\n"


class MarkedLines:
    """Reassembles marked payloads from a job's log lines: feed lines, get (marker, payload)."""

    MARKERS = (PLAN_MARKER, STARTED_MARKER, RECORD_MARKER, END_MARKER, TRIAL_MARKER)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """(marker, payload) when `line` ends a marked payload; ("", line) for any other line."""
        if line.startswith(PART_MARKER):
            self.parts.append(line[len(PART_MARKER) :])
            return None
        for marker in self.MARKERS:
            if line.startswith(marker):
                payload = "".join(self.parts) + line[len(marker) :]
                self.parts.clear()
                return marker, payload
        return "", line


def complete_lines(text: str) -> list[str]:
    """A log's lines without a last one still being written (no newline yet)."""
    return text.split("\n")[:-1]


class Follower:
    """Hands the remote driver's marked lines to its callbacks, as they arrive.

    `on_start(job_id, quiet)` and `on_record(outcome, quiet)` keep what the lines say
    (`quiet` while a whole log is replayed: keep it, show nothing); `say` shows the
    driver's other lines. Each record is handed over once, however often its line is read.
    """

    def __init__(
        self,
        on_start: Callable[[str, bool], None],
        on_record: Callable[[JobOutcome, bool], None],
        say: Callable[[str], None],
        on_trial: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.on_start = on_start
        self.on_trial = on_trial
        self.on_record = on_record
        self.say = say
        self.partial = ""
        self.reader = MarkedLines()
        self.kept = 0
        self.end: dict[str, Any] | None = None
        self.quiet = False
        self.count_starts = True
        self.ended: set[str] = set()  # jobs whose record is kept: a replayed line is not kept twice

    def chunk(self, text: str) -> None:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self.line(line)

    def flush(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = ""

    def replay(self, lines: list[str], count_starts: bool = True) -> None:
        """Feed a whole log quietly, from its beginning.

        `count_starts=False` for a log whose start lines were already applied: each one
        counts an attempt in the ledger.
        """
        self.reader = MarkedLines()
        saved = self.quiet, self.count_starts
        self.quiet, self.count_starts = True, count_starts
        try:
            for line in lines:
                self.line(line)
        finally:
            self.quiet, self.count_starts = saved

    def line(self, line: str) -> None:
        marked = self.reader.feed(line.rstrip("\r"))
        if marked is None:
            return
        marker, payload = marked
        try:
            if marker == RECORD_MARKER:
                self._keep(decode_outcome(payload))
            elif marker == STARTED_MARKER:
                self._started(payload.strip())
            elif marker == END_MARKER:
                self.end = json.loads(payload)
            elif marker == TRIAL_MARKER:
                if self.on_trial is not None:
                    self.on_trial(json.loads(payload))
            elif marker == "" and payload.strip() and not RAY_LOG_LINE.match(payload) and not self.quiet:
                self.say(f"cluster: {payload}")
        except (ValueError, KeyError, binascii.Error) as error:
            # A line cut or mixed with another writer's: say so and go on; the job's
            # record can still be fetched from the whole log later.
            self.say(f"skipped an unreadable {marker.strip()} line ({len(payload)} chars): {error}")

    def _keep(self, outcome: JobOutcome) -> None:
        if outcome.id in self.ended:
            return
        self.on_record(outcome, self.quiet)
        self.ended.add(outcome.id)  # only once kept: an interrupt before this keeps it again
        self.kept += 1

    def _started(self, job_id: str) -> None:
        if job_id in self.ended or not self.count_starts:
            return
        self.on_start(job_id, self.quiet)


def ended_in(lines: list[str]) -> set[str]:
    """The ids of the jobs whose record a log holds."""
    reader = MarkedLines()
    ended = set()
    for line in lines:
        marked = reader.feed(line)
        if marked and marked[0] == RECORD_MARKER:
            try:
                ended.add(json.loads(marked[1])["record"]["id"])
            except (ValueError, KeyError):
                continue  # unreadable: the Follower says so when it reads it
    return ended


def plan_from(lines: list[str]) -> dict[str, Any] | None:
    reader = MarkedLines()
    for line in lines:
        marked = reader.feed(line)
        if marked and marked[0] == PLAN_MARKER:
            return json.loads(marked[1])
    return None


def encode_outcome(outcome: JobOutcome) -> str:
    """One line of JSON: the record, the output beside it, the model files as base64."""
    files = {name: base64.b64encode(data).decode() for name, data in outcome.model_files.items()}
    return json.dumps({"record": outcome.record, "logs": outcome.logs, "model_files": files})


def decode_outcome(text: str) -> JobOutcome:
    payload = json.loads(text)
    files = {name: base64.b64decode(data) for name, data in (payload.get("model_files") or {}).items()}
    return JobOutcome(payload["record"], payload.get("logs") or [], files)
