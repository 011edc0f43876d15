"""Planning: from what the user asked for to the jobs to run, checked without Ray.

The jobs come from a spec file or the submit options; each job's data is loaded once per
distinct source, and everything that depends only on the data is checked here (the
prediction inputs' width) and every user model's code is read and checked (its syntax,
a builder for each framework its jobs run on: workers/models/user.py, without running it
or importing a framework), so bad input is refused before any cluster is touched. What
depends on the cluster (a job's GPUs) is resolved by the executor once it is connected
(`resolve_for_cluster`), in the same terms.

A user model's code is part of its jobs' ids (the sha256 of its text): a sweep job's
hash covers it (jobs/plan/sweep.py), and a job named by the submit options carries its
first 8 hex digits (`torch-1a2b3c4d`), so editing the model runs its jobs again in the
same output directory, where unchanged jobs are found done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from jobs.plan.keep_warm import KeepWarm
from jobs.plan.optuna_search import SearchSpec
from jobs.plan.spec import JobSpec, Overrides, SpecError, build_job_specs, job_ids
from jobs.plan.stopping_rule import StoppingRule
from jobs.plan.sweep import SweepSpec, trial_job
from workers import models
from workers.data import ARTICLE_PREDICTION_SQFT, Dataset, load_dataset
from workers.models import user as user_models

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
    wait_for_nodes: int | None = None  # start once the cluster has this many nodes alive
    # --keep-warm: how long warm workers outlive the run on a running cluster (None: the default)
    keep_warm: KeepWarm | None = None
    run_id: str | None = None  # a new run's id; default: a fresh one (a directory keeps its own)
    stopping: StoppingRule | None = None  # default: the spec file's `stopping:`, if any
    search: SearchSpec | None = None  # default: the spec file's `search:`, if any (a remote driver's)
    study_from: Path | None = None  # the study a remote driver continues, shipped by its client


@dataclass(frozen=True)
class PlannedJob:
    """A job ready to run: its id, its spec (resolved for its data) and the data itself.

    A pack (jobs/plan/packing.py) is a PlannedJob too: its own id, its first member's spec
    and data, and its `members`, the jobs it trains together.
    """

    id: str
    spec: JobSpec
    dataset: Dataset
    members: tuple[PlannedJob, ...] = ()

    @property
    def jobs(self) -> tuple[PlannedJob, ...]:
        """The jobs this unit records: a pack's members, or the job itself."""
        return self.members or (self,)


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
    return [(with_model_digest(job_id, spec), spec) for job_id, spec in zip(job_ids(specs), specs)]


def with_model_digest(job_id: str, spec: JobSpec) -> str:
    """A user model's job id carries its code's digest: an edited model is a new job."""
    if models.is_built_in(spec.model):
        return job_id
    return f"{job_id}-{read_user_model(spec.model).digest[:8]}"


def read_user_model(model: str) -> models.UserModelSource:
    """A user model's code, or a SpecError (exit 2) saying why it cannot be read."""
    try:
        return user_models.read_source(model)
    except user_models.UserModelError as error:
        raise SpecError(str(error)) from None


def check_user_models(jobs: list[tuple[str, JobSpec]]) -> None:
    """Each user model read and checked for the frameworks its jobs run on: a SpecError if it cannot run."""
    needed: dict[str, set[str]] = {}
    for _, spec in jobs:
        if not models.is_built_in(spec.model):
            needed.setdefault(spec.model, set()).add(spec.framework)
    for model, frameworks in needed.items():
        try:
            user_models.check(read_user_model(model), frameworks)
        except user_models.UserModelError as error:
            raise SpecError(str(error)) from None


def check_request(request: SubmitRequest) -> None:
    """The request's own options, before any job is planned."""
    if request.max_concurrent is not None and request.max_concurrent < 1:
        raise SpecError(f"--max-concurrent {request.max_concurrent}: must be a whole number >= 1")
    if request.rerun is not None and request.rerun not in RERUN_CHOICES:
        raise SpecError(f"--rerun {request.rerun}: choose one of {', '.join(RERUN_CHOICES)}")


def plan_jobs(request: SubmitRequest) -> list[PlannedJob]:
    """Build, load and check every job without touching Ray."""
    check_request(request)
    # Each user model is read once: its ids, its check and its workers' code share that text.
    with user_models.planning():
        jobs = expand_jobs(request)
        check_user_models(jobs)
    datasets: dict[tuple, Dataset] = {}
    planned = []
    for job_id, spec in jobs:
        key = (spec.data, spec.features, spec.target)
        if key not in datasets:
            datasets[key] = load_dataset(spec.data, spec.features, spec.target)
        dataset = datasets[key]
        planned.append(PlannedJob(job_id, resolve_for_data(spec, dataset), dataset))
    return planned


def stopping_of(request: SubmitRequest) -> StoppingRule | None:
    """The early-stopping rule of the request, or of its spec file; None without one."""
    if request.stopping is not None or request.spec_file is None:
        return request.stopping
    return SweepSpec.load(request.spec_file).stopping


def search_of(request: SubmitRequest) -> SearchSpec | None:
    """The adaptive search the request's spec file asks for; None for every other request."""
    if request.spec_file is None:
        return None
    return SweepSpec.load(request.spec_file).search_spec()


class TrialPlanner:
    """Plans a search's trials as jobs, each checked like any job, sharing each data source's load."""

    def __init__(self, search: SearchSpec, overrides: Overrides) -> None:
        self.search = search
        self.overrides = overrides
        self.datasets: dict[tuple, Dataset] = {}
        # The jobs `check` planned: the executor resolves them once connected, so a space
        # the cluster cannot hold (GPUs it lacks) is refused before any trial runs.
        self.probes: list[PlannedJob] = []

    def check(self) -> None:
        """Refuse at plan time what a trial could draw and not run: each choice, each range's ends."""
        ends: list[dict] = [{}]
        for name, distribution in self.search.distributions.items():
            if distribution.kind == "choice":
                ends += [{name: value} for value in distribution.arguments]
            else:
                ends += [{name: bound} for bound in distribution.arguments]
        self.search.digest(self.overrides.to_record())  # refuses what a study could not be keyed by
        first = {name: d.arguments[0] for name, d in self.search.distributions.items()}
        with user_models.planning():
            for end in ends:
                job_id, spec = trial_job({**self.search.defaults, **first, **end}, self.overrides, 0)
                check_user_models([(job_id, spec)])
                dataset = self.dataset_for(spec)
                self.probes.append(PlannedJob(job_id, resolve_for_data(spec, dataset), dataset))

    def check_shippable(self) -> None:
        """Refuse what a remote driver could not find on the head: CSV files and user models' code."""
        values = [self.search.defaults, self.overrides.common, *self.overrides.per_framework.values()]
        values += [{name: value} for name, d in self.search.distributions.items() for value in d.arguments]
        for fields in values:
            data, model = fields.get("data", "article"), fields.get("model", "linear")
            if isinstance(data, str) and not (data == "article" or data.startswith("synthetic")):
                raise SpecError(
                    f"data={data}: a search over Ray Jobs draws its trials on the head, which does not "
                    "have this file; search it with the cluster's Ray address (--address HEAD:6379)"
                )
            if isinstance(model, str) and not models.is_built_in(model):
                raise SpecError(
                    f"model={model}: a search over Ray Jobs draws its trials on the head, which does not "
                    "have this model's code; search it with the cluster's Ray address (--address HEAD:6379)"
                )

    def job(self, fields: dict, number: int) -> PlannedJob:
        job_id, spec = trial_job(fields, self.overrides, number)  # its id covers a user model's code
        dataset = self.dataset_for(spec)
        return PlannedJob(job_id, resolve_for_data(spec, dataset), dataset)

    def dataset_for(self, spec: JobSpec) -> Dataset:
        key = (spec.data, spec.features, spec.target)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(spec.data, spec.features, spec.target)
        return self.datasets[key]


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
