"""`runjobs submit` as a function: plan and validate, connect, run, record, report.

Everything that can be checked without Ray (the spec, the data, the output directory,
another driver's lock) is checked before connecting, so bad input starts nothing and
leaves nothing behind. The output directory's ledger is the run's durable record: a
re-run of the same jobs into the same directory runs only what has no result yet.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.plan.spec import JobSpec, Overrides, SpecError, build_job_specs, job_ids
from jobs.plan.sweep import SweepSpec
from jobs.record.ledger import Ledger, is_ledger_directory
from jobs.record.models import store_job_model
from jobs.record.output import check_usable, write_job_logs
from jobs.report import combined as reports
from jobs.report.files import write_report_json, write_reports
from jobs.run import cluster as clusters
from jobs.run.driver import PlannedJob, RunInterrupted, run_jobs
from jobs.run.progress import LineProgress
from workers.data import ARTICLE_PREDICTION_SQFT, Dataset, load_dataset

RERUN_CHOICES = ("failed", "all")


@dataclass
class SubmitRequest:
    frameworks: tuple[str, ...] = ()
    overrides: Overrides = field(default_factory=Overrides)
    preset: str | None = None
    address: str | None = None
    output: Path | None = None
    variants: tuple[str, ...] = ()
    spec_file: Path | None = None
    rerun: str | None = None  # None: only jobs without a result; "failed"; "all"
    max_concurrent: int | None = None
    run_id: str | None = None  # a new run's id; default: a fresh one (a directory keeps its own)


@dataclass
class SubmitOutcome:
    report: dict[str, Any]
    output_dir: Path
    ran: int = 0  # jobs this call ran (a re-run may run none)

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded, 1 when any did not."""
        return exit_code_for(self.report)


def exit_code_for(report: dict[str, Any]) -> int:
    return 0 if report["summary"]["succeeded"] == len(report["jobs"]) else 1


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def expand_jobs(request: SubmitRequest) -> list[tuple[str, JobSpec]]:
    """The (id, spec) of every job the request names, from a spec file or the options."""
    if request.spec_file is not None:
        if request.frameworks or request.variants or request.preset:
            raise SpecError(
                "with a spec file, name frameworks, variants and presets in the file "
                "(grid: {framework: [...], variant: [...]}), not as options"
            )
        return SweepSpec.load(request.spec_file).expand(request.overrides)
    specs = build_job_specs(request.frameworks, request.overrides, request.preset, request.variants)
    return list(zip(job_ids(specs), specs))


def plan_jobs(request: SubmitRequest) -> list[PlannedJob]:
    """Build, load and check every job without touching Ray."""
    if request.max_concurrent is not None and request.max_concurrent < 1:
        raise SpecError(f"--max-concurrent {request.max_concurrent}: must be a whole number >= 1")
    if request.rerun is not None and request.rerun not in RERUN_CHOICES:
        raise SpecError(f"--rerun {request.rerun}: choose one of {', '.join(RERUN_CHOICES)}")
    datasets: dict[tuple, Dataset] = {}
    planned = []
    for job_id, spec in expand_jobs(request):
        key = (spec.data, spec.features, spec.target)
        if key not in datasets:
            datasets[key] = load_dataset(spec.data, spec.features, spec.target)
        dataset = datasets[key]
        planned.append(PlannedJob(job_id, resolve_for_data(spec, dataset), dataset))
    return planned


def resolve_for_data(spec: JobSpec, dataset: Dataset) -> JobSpec:
    """Fill the fields that depend on the data: the batch size and the prediction inputs."""
    predict = spec.predict
    if not predict and spec.data == "article":
        predict = ((ARTICLE_PREDICTION_SQFT,),)
    for point in predict:
        if len(point) != dataset.feature_count:
            raise SpecError(
                f"predict {','.join(f'{value:g}' for value in point)} has {len(point)} value(s) but the data "
                f"has {dataset.feature_count} feature(s) ({', '.join(dataset.feature_names)}); "
                "give one value per feature, separated by commas"
            )
    batch_size = spec.batch_size if spec.batch_size is not None else dataset.rows
    return dataclasses.replace(spec, predict=predict, batch_size=batch_size)


def should_run(state: str, rerun: str | None) -> bool:
    """Whether a job in `state` runs again: never-finished jobs always, others on request.

    A failed job keeps its error as its result, so a cron re-run does not retry a job
    that fails the same way every time; `--rerun failed` asks for that.
    """
    if rerun == "all":
        return True
    if state in ("pending", "running", "cancelled"):
        return True
    return state == "failed" and rerun == "failed"


def submit(
    request: SubmitRequest,
    progress: LineProgress | None = None,
    planned: list[PlannedJob] | None = None,
    forward: Callable[[dict[str, Any]], None] | None = None,
    write_report_files: bool = True,
) -> SubmitOutcome:
    """Run the request's jobs that have no result yet; `progress` shows what happens (default: lines).

    `planned` replaces planning from the request (a remote driver gets its jobs planned by
    the client); `forward` sees each job's whole record, logs and model files included,
    before it is kept (a remote driver sends it to the client, which writes the report
    files itself, hence `write_report_files`).
    """
    progress = progress or LineProgress()
    planned = plan_jobs(request) if planned is None else planned
    run_id = request.run_id or new_run_id()
    output_dir = request.output or Path("runs") / run_id
    ledger = None
    if is_ledger_directory(output_dir):
        ledger = Ledger.open(output_dir, for_writing=True)  # refuses while another driver runs
    else:
        check_usable(output_dir)
    try:
        if ledger is not None:
            states = {job.id: job.status for job in ledger.jobs()}
            if not any(should_run(states.get(job.id, "pending"), request.rerun) for job in planned):
                # Every job already has its result: a cron re-run needs no Ray at all.
                progress.say(
                    f"nothing to run: all {len(planned)} job(s) in {output_dir} already have results"
                )
                report = rebuild_report(output_dir, ledger, {job.id for job in planned})
                return SubmitOutcome(report, output_dir, ran=0)
        return _run(request, planned, output_dir, ledger, run_id, progress, forward, write_report_files)
    finally:
        if ledger is not None:
            ledger.close()


def _run(
    request, planned, output_dir, ledger, new_id, progress: LineProgress, forward, write_report_files
) -> SubmitOutcome:
    driver_timings: dict[str, float] = {}
    connect_started = time.perf_counter()
    shutdown = clusters.BackgroundShutdown()
    with clusters.connected(request.address, shutdown) as cluster:
        driver_timings["connect_s"] = time.perf_counter() - connect_started
        resolved = []
        for job in planned:
            gpus = job.spec.gpus_per_job
            if gpus is None:
                # One GPU a device where the cluster has GPUs.
                gpus = float(job.spec.workers) if cluster.gpus > 0 else 0.0
            spec = dataclasses.replace(job.spec, gpus_per_job=gpus)
            clusters.check_fits(spec, cluster)
            resolved.append(dataclasses.replace(job, spec=spec))

        if ledger is None:
            ledger = Ledger.open(output_dir, for_writing=True)
        meta = ledger.meta()
        run_id = meta.get("run_id") or new_id
        ledger.set_meta(run_id=run_id, started_at=time.time(), cluster=cluster.to_record(), finished_at=None)
        ledger.add_jobs([(job.id, job.spec.to_record()) for job in resolved])
        states = {job.id: job.status for job in ledger.jobs()}
        to_run = [job for job in resolved if should_run(states[job.id], request.rerun)]
        for job in to_run:
            ledger.mark(job.id, "pending")
        skipped = len(resolved) - len(to_run)
        progress.begin(len(to_run))
        progress.say(
            f"run {run_id}: {len(to_run)} job(s) to run"
            + (f", {skipped} already done" if skipped else "")
            + f" on {cluster.address} ({cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU); "
            f"output {output_dir}"
        )

        def on_record(record: dict[str, Any]) -> None:
            if forward is not None:
                forward(record)
            keep_record(output_dir, ledger, record)
            progress.ended(record)

        def on_start(job_id: str) -> None:
            ledger.mark(job_id, "running")
            progress.started(job_id)

        jobs_started = time.perf_counter()
        interrupted = None
        try:
            run_jobs(to_run, on_record, on_start, request.max_concurrent, ledger.cancel_requested)
        except RunInterrupted as interruption:
            interrupted = interruption
            if interruption.requested:
                # `runjobs cancel` waits for this answer: what its request cancelled.
                ledger.set_meta(
                    cancel_outcome={
                        "at": time.time(),
                        "running": interruption.running,
                        "pending": interruption.pending,
                    }
                )
                progress.say(
                    f"cancelled by runjobs cancel: {interruption.running} running and "
                    f"{interruption.pending} pending job(s) recorded cancelled"
                )
        driver_timings["jobs_s"] = time.perf_counter() - jobs_started

    # Ray shuts down while the reports are written (see BackgroundShutdown); its time
    # reaches report.json, written again once it is known.
    ledger.set_meta(finished_at=time.time())
    wanted = {job.id for job in resolved}
    records = [record for record in ledger.records() if record["id"] in wanted]
    report = reports.build_report(run_id, cluster.to_record(), records, driver_timings)
    if write_report_files:
        write_reports(output_dir, report)
    disconnect_s = shutdown.wait()
    if disconnect_s is not None:
        driver_timings["disconnect_s"] = disconnect_s
        report["driver"]["timings"]["disconnect_s"] = disconnect_s
        if write_report_files:
            write_report_json(output_dir, report)
    ledger.set_meta(driver_timings=driver_timings)
    if interrupted is not None:
        progress.say(f"interrupted: finished jobs are kept in {output_dir}")
        raise interrupted
    return SubmitOutcome(report, output_dir, ran=len(to_run))


def keep_record(output_dir: Path, ledger: Ledger, record: dict[str, Any]) -> None:
    """Make an ended job's record durable: its logs and model files first, then the ledger."""
    write_job_logs(output_dir, record["id"], record.pop("logs", None) or [])
    # Model files go to DIR/models/JOB before the record (which names them) is durable.
    store_job_model(output_dir, record)
    ledger.mark(record["id"], record["status"], record)


def rebuild_report(
    output_dir: Path, ledger: Ledger | None = None, job_ids: set[str] | None = None
) -> dict[str, Any]:
    """The report files again, from the ledger alone: no Ray, no framework."""
    owned = ledger is None
    ledger = ledger or Ledger.open(output_dir, for_writing=False)
    try:
        meta = ledger.meta()
        records = [record for record in ledger.records() if job_ids is None or record["id"] in job_ids]
        report = reports.build_report(
            meta.get("run_id", output_dir.name), meta.get("cluster", {}), records, meta.get("driver_timings")
        )
    finally:
        if owned:
            ledger.close()
    write_reports(output_dir, report)
    return report
