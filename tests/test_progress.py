"""Progress: plain timestamped lines off a terminal, a live display on one."""

from __future__ import annotations

import io
import re

from rich.console import Console

from jobs.run.progress import LineProgress, LiveProgress, for_stream, format_eta


def record(job_id, status="succeeded", convergence="converged", error=None):
    return {"id": job_id, "status": status, "convergence": convergence, "error": error,
            "timings": {"total_s": 1.25}}  # fmt: skip


def test_off_a_terminal_each_end_is_one_timestamped_line_with_the_counts(capsys):
    progress = for_stream(io.StringIO())
    assert type(progress) is LineProgress
    with progress:
        progress.begin(3)
        progress.started("a")
        progress.ended(record("a"))
        progress.ended(record("b", "failed", None, "ValueError: boom"))
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] \[1/3 done\] a succeeded \(converged\) in 1\.2s", lines[0])
    assert lines[1].endswith("[2/3 done, 1 failed] b failed (ValueError: boom) in 1.2s")


def test_a_cancelled_job_is_counted_apart_from_the_failed_ones(capsys):
    progress = for_stream(io.StringIO())
    with progress:
        progress.begin(5)
        for job_id in ("a", "b", "c"):
            progress.ended(record(job_id))
        progress.ended(record("d", "failed", None, "ValueError: boom"))
        progress.ended(record("e", "cancelled", None, "cancelled: runjobs cancel"))
    lines = capsys.readouterr().err.splitlines()
    assert "[4/5 done, 1 failed] d failed" in lines[3]
    assert "[5/5 done, 1 failed, 1 cancelled] e cancelled (cancelled: runjobs cancel)" in lines[4]


def test_on_a_terminal_a_live_line_counts_done_running_failed_and_an_eta():
    screen = io.StringIO()
    progress = LiveProgress(Console(file=screen, force_terminal=True, width=120))
    with progress:
        progress.begin(4)
        for job_id in ("a", "b", "c"):
            progress.started(job_id)
        progress.ended(record("a"))
        progress.ended(record("b", "cancelled", None, "timed out after 3s (timeout_s)"))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without the terminal codes
    assert "a succeeded (converged) in 1.2s" in text
    assert "2/4" in text and "running 1, failed 0, cancelled 1" in text
    assert re.search(r"ETA \d+:\d\d", text), text


def test_the_eta_follows_the_rate_so_far():
    assert format_eta(10.0, 0, 4) == "-"
    assert format_eta(10.0, 2, 4) == "0:10"
    assert format_eta(100.0, 1, 100) == "2:45:00"
    assert format_eta(10.0, 4, 4) == "-"
