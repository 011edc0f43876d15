"""The report files of a run's directory: report.csv, .md, .html, the TensorBoard files, report.json last.

Each is written to a temporary name and renamed into place (jobs/record/output.py), so
a reader never sees half a file; report.json, the file schedulers read, comes last.

A report built from the ledger holds its records light (Ledger.records(light=True):
without the per-epoch `history` series, which no table or figure reads); report.json
and the TensorBoard files take every record whole from the ledger, one at a time, so a
10,000-job sweep's report never holds all of its histories at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.record.ledger import Ledger
from jobs.record.output import write_atomically
from jobs.report import combined as reports


def write_reports(directory: Path, report: dict[str, Any], ledger: Ledger | None = None) -> None:
    """Every report file; with `ledger`, the report's records are light and whole ones come from it."""
    write_atomically(directory / "report.csv", reports.to_csv(report))
    write_atomically(directory / "report.md", reports.to_markdown(report))
    write_atomically(directory / "report.html", render_report_html(report))
    from jobs.report.tensorboard import MAX_JOB_RUNS, write_event_files  # TensorBoard's protos only here

    if ledger is not None and len(report["jobs"]) <= MAX_JOB_RUNS:
        # One run a job, with every per-epoch series: few enough records to hold whole.
        wanted = {job["id"] for job in report["jobs"]}
        whole = [record for record in ledger.records() if record["id"] in wanted]
        write_event_files({**report, "jobs": whole}, directory)
    else:
        # Past the limit, the seed groups' runs hold the losses and final values.
        write_event_files(report, directory)  # DIR/tensorboard/JOB, rebuilt whole
    write_report_json(directory, report, ledger)


def write_report_json(directory: Path, report: dict[str, Any], ledger: Ledger | None = None) -> None:
    """report.json, the file schedulers read: always written last; whole records from `ledger`."""
    whole = None
    if ledger is not None:
        whole = ledger.raw_records({job["id"] for job in report["jobs"]})
    write_atomically(directory / "report.json", reports.json_parts(report, whole))


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
    owned = ledger is None
    ledger = ledger or Ledger.open(output_dir, for_writing=False)
    try:
        report = report_from_ledger(output_dir, ledger, job_ids)
        write_reports(output_dir, report, ledger)
    finally:
        if owned:
            ledger.close()
    return report


def report_from_ledger(
    output_dir: Path, ledger: Ledger | None = None, job_ids: set[str] | None = None
) -> dict[str, Any]:
    """The run's report as its ledger holds it now, without writing any file (its records light)."""
    owned = ledger is None
    ledger = ledger or Ledger.open(output_dir, for_writing=False)
    try:
        meta = ledger.meta()
        records = [
            record for record in ledger.records(light=True) if job_ids is None or record["id"] in job_ids
        ]
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
