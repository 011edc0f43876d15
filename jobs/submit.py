"""`runjobs submit` as a function: plan and validate, connect, run, record, report.

Everything that can be checked without Ray (the spec, the data, the output directory)
is checked before connecting, so bad input starts nothing and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import cluster as clusters
from jobs import report as reports
from jobs.driver import PlannedJob, RunInterrupted, run_jobs
from jobs.output import RunDirectory, check_usable
from jobs.spec import JobSpec, Overrides, SpecError, build_job_specs, job_ids
from workers.data import ARTICLE_PREDICTION_SQFT, Dataset, load_dataset


@dataclass
class SubmitRequest:
    frameworks: tuple[str, ...] = ()
    overrides: Overrides = field(default_factory=Overrides)
    preset: str | None = None
    address: str | None = None
    output: Path | None = None
    variants: tuple[str, ...] = ()


@dataclass
class SubmitOutcome:
    report: dict[str, Any]
    output_dir: Path

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded, 1 when any did not."""
        return 0 if self.report["summary"]["succeeded"] == len(self.report["jobs"]) else 1


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def plan_jobs(request: SubmitRequest) -> list[PlannedJob]:
    """Build, load and check every job without touching Ray."""
    specs = build_job_specs(request.frameworks, request.overrides, request.preset, request.variants)
    datasets: dict[tuple, Dataset] = {}
    planned = []
    for job_id, spec in zip(job_ids(specs), specs):
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


def submit(request: SubmitRequest, say: Callable[[str], None]) -> SubmitOutcome:
    planned = plan_jobs(request)
    run_id = new_run_id()
    output_dir = request.output or Path("runs") / run_id
    check_usable(output_dir)

    # The driver's own time, for the report's start-up breakdown.
    driver_timings: dict[str, float] = {}
    connect_started = time.perf_counter()
    with clusters.connected(request.address) as cluster:
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

        directory = RunDirectory.create(output_dir)
        say(
            f"run {run_id}: {len(resolved)} job(s) on {cluster.address} "
            f"({cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU); output {output_dir}"
        )

        def on_record(record: dict[str, Any]) -> None:
            directory.record_job(record)
            detail = record["convergence"] if record["status"] == "succeeded" else record["error"]
            say(f"{record['id']} {record['status']} ({detail}) in {record['timings']['total_s']:.1f}s")

        jobs_started = time.perf_counter()
        interrupted = None
        try:
            records = run_jobs(resolved, on_record)
        except RunInterrupted as interruption:
            records, interrupted = interruption.records, interruption
        driver_timings["jobs_s"] = time.perf_counter() - jobs_started
        disconnect_started = time.perf_counter()
    driver_timings["disconnect_s"] = time.perf_counter() - disconnect_started

    report = reports.build_report(run_id, cluster.to_record(), records, driver_timings)
    directory.write_reports(report)
    if interrupted is not None:
        say(f"interrupted: finished jobs are kept and the report is in {output_dir}")
        raise interrupted
    return SubmitOutcome(report, output_dir)
