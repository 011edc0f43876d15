"""Planning: from what the user asked for to the jobs to run, checked without Ray.

The jobs come from a spec file or the submit options; each job's data is loaded once per
distinct source, and everything that depends only on the data is checked here (the
prediction inputs' width), so bad input is refused before any cluster is touched. What
depends on the cluster (a job's GPUs) is resolved by the executor once it is connected
(`resolve_for_cluster`), in the same terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from jobs.plan.spec import JobSpec, Overrides, SpecError, build_job_specs, job_ids
from jobs.plan.sweep import SweepSpec
from workers.data import ARTICLE_PREDICTION_SQFT, Dataset, load_dataset

RERUN_CHOICES = ("failed", "all")


@dataclass
class SubmitRequest:
    """What `runjobs submit` was asked: the jobs (options or a spec file) and where to run them."""

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


@dataclass(frozen=True)
class PlannedJob:
    """A job ready to run: its id, its spec (resolved for its data) and the data itself."""

    id: str
    spec: JobSpec
    dataset: Dataset


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


def resolve_for_cluster(job: PlannedJob, cluster_has_gpus: bool) -> PlannedJob:
    """Fill what depends on the cluster: without --gpus-per-job, one GPU a device where it has GPUs."""
    if job.spec.gpus_per_job is not None:
        return job
    gpus = float(job.spec.workers) if cluster_has_gpus else 0.0
    return dataclasses.replace(job, spec=dataclasses.replace(job.spec, gpus_per_job=gpus))


def should_run(status: str, rerun: str | None) -> bool:
    """Whether a job in `status` runs again: never-finished jobs always, others on request.

    A failed job keeps its error as its result, so a cron re-run does not retry a job
    that fails the same way every time; `--rerun failed` asks for that.
    """
    if rerun == "all":
        return True
    if status in ("pending", "running", "cancelled"):
        return True
    return status == "failed" and rerun == "failed"
