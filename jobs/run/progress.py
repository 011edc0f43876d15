"""How a running submit shows its progress: timestamped lines, or a live display on a terminal.

A scheduler's log (Slurm, cron, CI) gets plain lines, one per event, each with the time
and the done/failed/cancelled counts so far. A person at a terminal gets one live line
instead: done, running, failed and cancelled counts, elapsed time and an ETA from the
jobs finished so far, with each job's end still printed above it.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class LineProgress:
    """Timestamped lines on stderr: what a log file or a pipe should receive."""

    def __init__(self) -> None:
        self.total = 0
        self.counts = {"succeeded": 0, "stopped": 0, "failed": 0, "cancelled": 0}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def begin(self, total: int) -> None:
        self.total = total

    def started(self, job_id: str) -> None:
        pass

    def reported(self, latest: dict[str, list[float]]) -> None:
        """Running jobs' latest [epoch, loss] under a stopping rule: no line each, a log would flood."""

    def ended(self, record: dict[str, Any]) -> None:
        self.counts[record["status"]] += 1
        self.say(f"[{self._done_text()}] {describe_end(record)}")

    def pack_ended(self, pack_id: str, records: list[dict[str, Any]]) -> None:
        """A pack's members, counted each, shown in one line (jobs/plan/packing.py)."""
        for record in records:
            self.counts[record["status"]] += 1
        self.say(f"[{self._done_text()}] {describe_pack_end(pack_id, records)}")

    def _done_text(self) -> str:
        """`3/5 done, 1 stopped, 1 failed`: stopped and cancelled jobs did not fail: each is counted apart."""
        text = f"{sum(self.counts.values())}/{self.total} done"
        for status in ("stopped", "failed", "cancelled"):
            if self.counts[status]:
                text += f", {self.counts[status]} {status}"
        return text


class MessagesOnly(LineProgress):
    """The run's messages without a line per job: for a driver whose jobs someone else shows."""

    def ended(self, record: dict[str, Any]) -> None:
        self.counts[record["status"]] += 1

    def pack_ended(self, pack_id: str, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.ended(record)


class LiveProgress(LineProgress):
    """A live line at the bottom of the terminal (rich), each ended job printed above it."""

    def __init__(self, console=None) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.running: set[str] = set()
        self.started_at = time.monotonic()
        self.display = Progress(
            TextColumn("[bold]jobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "running {task.fields[running]}, failed {task.fields[failed]}, "
                "cancelled {task.fields[cancelled]}{task.fields[losses]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = self.display.add_task(
            "jobs", total=None, running=0, failed=0, cancelled=0, eta="-", losses=""
        )
        self.latest: dict[str, list[float]] = {}

    def __enter__(self) -> LiveProgress:
        self.display.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.display.stop()

    def say(self, message: str) -> None:
        self.display.console.print(f"[{time.strftime('%H:%M:%S')}] {message}", markup=False, highlight=False)

    def begin(self, total: int) -> None:
        super().begin(total)
        self.display.update(self.task, total=total)

    def started(self, job_id: str) -> None:
        self.running.add(job_id)
        self._refresh()

    def ended(self, record: dict[str, Any]) -> None:
        self.running.discard(record["id"])
        self.latest.pop(record["id"], None)
        self.counts[record["status"]] += 1
        self.say(describe_end(record))
        self._refresh()

    def pack_ended(self, pack_id: str, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.running.discard(record["id"])
            self.counts[record["status"]] += 1
        self.say(describe_pack_end(pack_id, records))
        self._refresh()

    def reported(self, latest: dict[str, list[float]]) -> None:
        self.latest = {job_id: report for job_id, report in latest.items() if job_id in self.running}
        self._refresh()

    def _refresh(self) -> None:
        done = sum(self.counts.values())
        self.display.update(
            self.task,
            completed=done,
            running=len(self.running),
            failed=self.counts["failed"],
            cancelled=self.counts["cancelled"],
            eta=format_eta(time.monotonic() - self.started_at, done, self.total),
            losses=self._losses(),
        )

    def _losses(self) -> str:
        """`, stopped 2, best running loss 0.0123 (epoch 40)` under a stopping rule."""
        text = f", stopped {self.counts['stopped']}" if self.counts["stopped"] else ""
        if self.latest:
            epoch, loss = min(self.latest.values(), key=lambda report: report[1])
            text += f", best running loss {loss:.4g} (epoch {int(epoch)})"
        return text


def describe_end(record: dict[str, Any]) -> str:
    if record["status"] == "stopped":
        stopped = record.get("stopped") or {}
        detail = f"after {stopped.get('epochs')} of {stopped.get('of')} epochs: {stopped.get('reason')}"
    else:
        detail = record["convergence"] if record["status"] == "succeeded" else record["error"]
    return f"{record['id']} {record['status']} ({detail}) in {record['timings']['total_s']:.1f}s"


def describe_pack_end(pack_id: str, records: list[dict[str, Any]]) -> str:
    """`pack-torch-1a2b 500 jobs: 498 succeeded (497 converged, 1 diverged), 2 failed in 3.1s`."""
    statuses: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    for record in records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        if record["status"] == "succeeded":
            verdict = str(record.get("convergence") or "").split(" ")[0].rstrip(":,")
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
    parts = []
    for status, count in statuses.items():
        text = f"{count} {status}"
        if status == "succeeded" and verdicts:
            text += " (" + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.items()) + ")"
        elif status != "succeeded":
            error = next((record.get("error") for record in records if record["status"] == status), None)
            text += f" ({error})" if error else ""
        parts.append(text)
    seconds = records[0]["timings"].get("total_s") or 0.0
    return f"{pack_id} {len(records)} jobs: {', '.join(parts)} in {seconds:.1f}s"


def format_eta(elapsed_s: float, done: int, total: int) -> str:
    """The time left at the rate jobs have finished so far; '-' until one has."""
    if done == 0 or total <= done:
        return "-"
    seconds = round(elapsed_s / done * (total - done))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def for_stream(stream=None) -> LineProgress:
    """A live display when the stream is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    return LiveProgress() if stream.isatty() else LineProgress()
