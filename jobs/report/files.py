"""The report files of a run's directory: report.csv, .md, .html, the TensorBoard files, report.json last.

Each is written to a temporary name and renamed into place (jobs/record/output.py), so
a reader never sees half a file; report.json, the file schedulers read, comes last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.record.ledger import Ledger
from jobs.record.output import write_atomically
from jobs.report import combined as reports


def write_reports(directory: Path, report: dict[str, Any]) -> None:
    write_atomically(directory / "report.csv", reports.to_csv(report))
    write_atomically(directory / "report.md", reports.to_markdown(report))
    write_atomically(directory / "report.html", render_report_html(report))
    from jobs.report.tensorboard import write_event_files  # imports TensorBoard's protos only here

    write_event_files(report, directory)  # DIR/tensorboard/JOB, rebuilt whole
    write_report_json(directory, report)


def write_report_json(directory: Path, report: dict[str, Any]) -> None:
    """report.json, the file schedulers read: always written last."""
    write_atomically(directory / "report.json", reports.json_parts(report))


def render_report_html(report: dict[str, Any]) -> str:
    """report.html; a page that cannot be rendered says why instead of costing the run report.json."""
    from jobs.report.html import render_html  # imports plotly only here

    try:
        return render_html(report)
    except Exception as error:  # any plotting failure (or plotly missing): the other files stand
        import html

        return (
            '<!DOCTYPE html><html><head><meta charset="utf-8"><title>runjobs report</title></head><body>'
            f"<p>report.html could not be rendered: {html.escape(f'{type(error).__name__}: {error}')}. "
            "report.json, report.csv and report.md hold the results; "
            "`runjobs report DIR` renders it again.</p></body></html>\n"
        )


def rebuild_report(
    output_dir: Path, ledger: Ledger | None = None, job_ids: set[str] | None = None
) -> dict[str, Any]:
    """The report files again, from the ledger alone: no Ray, no framework."""
    report = report_from_ledger(output_dir, ledger, job_ids)
    write_reports(output_dir, report)
    return report


def report_from_ledger(
    output_dir: Path, ledger: Ledger | None = None, job_ids: set[str] | None = None
) -> dict[str, Any]:
    """The run's report as its ledger holds it now, without writing any file."""
    owned = ledger is None
    ledger = ledger or Ledger.open(output_dir, for_writing=False)
    try:
        meta = ledger.meta()
        records = [record for record in ledger.records() if job_ids is None or record["id"] in job_ids]
        report = reports.build_report(
            meta.get("run_id", output_dir.name),
            meta.get("cluster", {}),
            records,
            meta.get("driver_timings"),
            meta.get("search"),
        )
    finally:
        if owned:
            ledger.close()
    return report
