"""Adaptive search: an Optuna study, kept in the run directory in step with the ledger.

    sample: {framework: {choice: [tensorflow, torch]}, lr: {loguniform: [0.001, 0.3]}}
    search: {algorithm: optuna, metric: loss.final, direction: minimize, trials: 64, parallel: 2}
    sample_seed: 0                       # the sampler's seed (TPE)

The driver asks the study for a trial, plans it as a job (the spec file's `defaults`,
then the trial's values, then `--set`), runs it, and tells the study the job's metric
once the ledger has kept its record. A trial's job id is the sweep id of its fields
plus its trial number (`torch-1a2b3c4d-trial7`), so two trials that draw the same
values stay two jobs.

The study lives in DIR/study.sqlite (Optuna's own RDB storage) and the order of writes
makes a driver killed at any moment lose nothing and run nothing twice:

    ask     the study records trial N as running     -> the ledger adds trial N's job
    end     the ledger keeps trial N's record        -> the study is told trial N's value

A re-run first reconciles the two: a running trial whose job has a record is told now;
one without a record (killed before it ended, or before its job reached the ledger)
is planned again from its values, with the same job id. A failed job is told failed,
as is one whose record lacks the metric; a job cancelled by an interrupt stays a
running trial, run again by the next run. Raising `trials` continues a finished study;
anything else that changes the search is refused, as a study cannot mean two searches.

Optuna is imported only when a search runs (the `search` extra).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.plan.fields import SpecError, settings_mapping
from jobs.plan.sampling import Distribution

STUDY_FILE = "study.sqlite"
STUDY_NAME = "runjobs"
ALGORITHMS = ("optuna",)
DIRECTIONS = ("minimize", "maximize")
SETTINGS = ("algorithm", "metric", "direction", "trials", "parallel")
# The numbers of a job's record a search may optimise (report.json's job entries): every
# model's losses and timings. A misspelt one would have every trial told failed.
METRICS = (
    "loss.final",
    "loss.r2_gap",
    "loss.floor_gap",
    "timings.train_s",
    "timings.setup_s",
    "timings.startup_s",
    "timings.predict_s",
    "timings.total_s",
    "timings.epoch_s_median",
)
MAX_PARALLEL = 1024
_TRIAL_SUFFIX = re.compile(r"-trial(\d+)$")


@dataclass(frozen=True)
class SearchSettings:
    """A spec file's `search:` mapping."""

    algorithm: str
    metric: str
    direction: str
    trials: int
    parallel: int

    @classmethod
    def parse(cls, where: str, value: Any) -> SearchSettings:
        usage = "e.g. search: {algorithm: optuna, metric: loss.final, direction: minimize, trials: 32}"
        value = settings_mapping(where, "search", value, SETTINGS, usage)
        algorithm = value.get("algorithm", "optuna")
        if algorithm not in ALGORITHMS:
            raise SpecError(
                f"{where}: search.algorithm={algorithm!r}: choose {', '.join(ALGORITHMS)} "
                "(for random search, give sample: and samples: without search:)"
            )
        metric = value.get("metric", "loss.final")
        if metric not in METRICS:
            raise SpecError(f"{where}: search.metric={metric!r}: choose one of {', '.join(METRICS)}")
        direction = value.get("direction", "minimize")
        if direction not in DIRECTIONS:
            raise SpecError(f"{where}: search.direction={direction!r}: choose {' or '.join(DIRECTIONS)}")
        from jobs.plan.sweep import max_jobs  # here: sweep.py imports this module

        trials, parallel = value.get("trials"), value.get("parallel", 1)
        # Trials count as a sweep's jobs do (RUNJOBS_MAX_JOBS); more trials at once than
        # MAX_PARALLEL would only queue, each asked of the study before any starts.
        for key, number, highest in (("trials", trials, max_jobs()), ("parallel", parallel, MAX_PARALLEL)):
            if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= highest:
                raise SpecError(f"{where}: search.{key}={number!r}: give a whole number from 1 to {highest}")
        return cls(algorithm, metric, direction, trials, parallel)


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """The metric's finite value in a job's record, or None when the record has none."""
    value: Any = record
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def trial_number(job_id: str) -> int | None:
    """The trial number a search job's id ends with; None for any other job."""
    match = _TRIAL_SUFFIX.search(job_id)
    return int(match.group(1)) if match else None


def optuna_distribution(distribution: Distribution):
    """The Optuna distribution that draws what `distribution` draws.

    A choice among values Optuna cannot store (lists, mappings: `hidden: [[32], [64, 64]]`)
    becomes a choice among their JSON texts, decoded back by `decoded`.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if distribution.kind == "uniform":
        return FloatDistribution(*distribution.arguments)
    if distribution.kind == "loguniform":
        return FloatDistribution(*distribution.arguments, log=True)
    if distribution.kind == "randint":
        return IntDistribution(*distribution.arguments)
    if _as_text(distribution):
        return CategoricalDistribution([_text(choice) for choice in distribution.arguments])
    return CategoricalDistribution(list(distribution.arguments))


def decoded(distribution: Distribution, value: Any) -> Any:
    """A trial's stored value as the field's value (a JSON text back to its list)."""
    return json.loads(value) if _as_text(distribution) else value


def _as_text(distribution: Distribution) -> bool:
    """Whether a choice's values are kept as JSON texts: all of them, once any is a list or mapping."""
    return distribution.kind == "choice" and any(not _plain(choice) for choice in distribution.arguments)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def check_storable(where: str, distribution: Distribution) -> None:
    """Refuse a choice Optuna cannot keep: a value with no JSON text (mixed key types, say)."""
    if not _as_text(distribution):
        return
    for choice in distribution.arguments:
        try:
            _text(choice)
        except (TypeError, ValueError):
            raise SpecError(
                f"{where}: the choice {choice!r} cannot be kept in the study; use text keys in mappings"
            ) from None


@dataclass(frozen=True)
class SearchSpec:
    """What a spec file asks a search for: the fixed fields, the distributions, the settings."""

    name: str
    defaults: dict[str, Any]
    distributions: dict[str, Distribution]
    settings: SearchSettings
    seed: int

    def to_record(self) -> dict[str, Any]:
        """JSON-ready, for a remote driver (`from_record` reads it back)."""
        return {
            "name": self.name,
            "defaults": self.defaults,
            "sample": {name: {d.kind: list(d.arguments)} for name, d in self.distributions.items()},
            "settings": dataclasses.asdict(self.settings),
            "seed": self.seed,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SearchSpec:
        distributions = {
            name: Distribution(kind, tuple(arguments))
            for name, value in record["sample"].items()
            for kind, arguments in value.items()
        }
        settings = SearchSettings(**record["settings"])
        return cls(record["name"], record["defaults"], distributions, settings, record["seed"])

    def described(self) -> dict[str, Any]:
        """The search as the ledger keeps it for the report: its settings and the fields it varies."""
        return {
            "algorithm": self.settings.algorithm,
            "metric": self.settings.metric,
            "direction": self.settings.direction,
            "trials": self.settings.trials,
            "parallel": self.settings.parallel,
            "seed": self.seed,
            "fields": list(self.distributions),
        }

    def digest(self, overrides: dict[str, Any]) -> str:
        """What makes two runs one search: all but `trials` (raising it continues) and `parallel`."""
        described = {
            "defaults": self.defaults,
            "distributions": {name: [d.kind, list(d.arguments)] for name, d in self.distributions.items()},
            "metric": self.settings.metric,
            "direction": self.settings.direction,
            "seed": self.seed,
            "overrides": overrides,
        }
        try:
            text = json.dumps(described, sort_keys=True, default=str)
        except TypeError:  # a mapping whose keys mix text and numbers cannot be sorted
            raise SpecError(
                "a mapping in this search (defaults, model_args, --set) mixes text and number keys; "
                "write every key as text"
            ) from None
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Study:
    """The run directory's Optuna study: ask for trials, tell it their records.

    Opened with `open`, which creates DIR/study.sqlite or loads it and refuses a study of
    another search (see the module's docstring for the order of writes that keeps it in
    step with the ledger).
    """

    def __init__(self, spec: SearchSpec, output_dir: Path, overrides_record: dict[str, Any]) -> None:
        self.spec = spec
        self.path = output_dir / STUDY_FILE
        self.identity = spec.digest(overrides_record)
        self.study = None
        self.distributions: dict[str, Any] = {}

    def open(self) -> Study:
        optuna = import_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.distributions = {name: optuna_distribution(d) for name, d in self.spec.distributions.items()}
        existed = self.path.exists()
        self.study = optuna.create_study(
            storage=f"sqlite:///{self.path.resolve()}",
            # One study per run directory, whatever the spec file is called; what makes it
            # this search is its identity, checked below.
            study_name=STUDY_NAME,
            direction=self.spec.settings.direction,
            sampler=optuna.samplers.TPESampler(seed=self.spec.seed),
            load_if_exists=True,
        )
        # Optuna keeps no sampler state in its storage: a study loaded again would draw its
        # random start-up trials from the seed's first draws again, repeating earlier trials.
        # Seeded by how many trials it already holds, an uninterrupted search draws exactly
        # what `sample_seed` gives, and a continued one draws anew.
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        # Kept here rather than read back for every question: the driver holds the run
        # directory's lock, so this process is the study's only writer, and Optuna reads
        # every trial from SQLite each time it is asked (tens of ms per call at 64 trials).
        self.held = len(trials)
        self.running_numbers = {trial.number for trial in trials if trial.state is TrialState.RUNNING}
        held = self.held
        if held:
            self.study.sampler = optuna.samplers.TPESampler(seed=(self.spec.seed + held) % 2**32)
        kept = self.study.user_attrs.get("runjobs_search")
        if kept is None and (not existed or not held):  # new, or stopped before its first trial
            self.study.set_user_attr("runjobs_search", self.identity)
        elif kept != self.identity:
            raise SpecError(
                f"{self.path.parent} holds a study of another search (its defaults, distributions, metric, "
                "direction, seed or --set differ); run this search into a new --output directory"
            )
        return self

    def close(self) -> None:
        """Let go of the storage's connections (Optuna keeps a SQLAlchemy engine per storage)."""
        storage = getattr(self.study, "_storage", None)
        engine = getattr(getattr(storage, "_backend", storage), "engine", None)
        if engine is not None:
            engine.dispose()

    # What the study holds.

    def trials(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False)

    def remaining(self) -> int:
        """Trials still to ask for: `trials` less every trial the study holds, running ones included."""
        return max(self.spec.settings.trials - self.held, 0)

    def fields_of(self, trial) -> dict[str, Any]:
        """The job fields a trial's values give (its own values over the file's defaults)."""
        values = {
            name: decoded(self.spec.distributions[name], value)
            for name, value in trial.params.items()
            if name in self.spec.distributions
        }
        return {**self.spec.defaults, **values}

    def running(self) -> list[Any]:
        from optuna.trial import TrialState

        return [trial for trial in self.trials() if trial.state is TrialState.RUNNING]

    # Asking and telling.

    def ask(self):
        """A new trial, recorded in the study as running before its job exists anywhere else."""
        trial = self.study.ask(self.distributions)
        self.held += 1
        self.running_numbers.add(trial.number)
        return trial

    def complete(self, trial):
        """A running trial whose values were being written when the driver stopped, with the
        sampler's draws for the rest (Optuna's `ask` writes a trial's values one at a time).

        `optuna.trial.Trial(study, trial_id)` is how `ask` itself hands a trial out; its
        suggest methods write the missing values to the same trial, keeping its number.
        """
        import optuna

        live = optuna.trial.Trial(self.study, trial._trial_id)
        for name, distribution in self.distributions.items():
            if name in trial.params:
                continue
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                live.suggest_categorical(name, distribution.choices)
            elif isinstance(distribution, optuna.distributions.IntDistribution):
                live.suggest_int(name, distribution.low, distribution.high)
            else:
                live.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
        return live

    def tell(self, number: int, record: dict[str, Any]) -> str:
        """Tell trial `number` its job's record; what it was told ("complete", "failed", or "" for nothing).

        A cancelled job (an interrupt) is left running: the next run runs it again.
        """
        from optuna.trial import TrialState

        if number not in self.running_numbers:
            return ""
        status = record.get("status")
        if status == "cancelled" and not str(record.get("error") or "").startswith("timed out"):
            return ""
        self.running_numbers.discard(number)
        if status == "stopped":  # the stopping rule ended it: Optuna's word for that is pruned
            self.study.tell(number, state=TrialState.PRUNED)
            return "pruned"
        value = metric_value(record, self.spec.settings.metric) if status == "succeeded" else None
        if value is None:
            self.study.tell(number, state=TrialState.FAIL)
            return "failed"
        self.study.tell(number, value)
        return "complete"

    def mirror_asked(self, number: int, params: dict[str, Any]) -> None:
        """A trial a remote driver asked its copy of this study for: the same trial here, running.

        Both studies held the same trials when the run was handed over, so a trial asked
        there takes the same number here; one already here (a log read again) is left.
        """
        from optuna.trial import TrialState, create_trial

        held = self.held
        if number < held:
            return
        if number > held:
            raise RuntimeError(
                f"trial {number} came from the remote driver while this study holds {held} trial(s): "
                "the studies went apart; run the search again into a new --output directory"
            )
        distributions = {name: self.distributions[name] for name in params}
        self.study.add_trial(
            create_trial(state=TrialState.RUNNING, params=params, distributions=distributions)
        )
        self.held += 1
        self.running_numbers.add(number)

    def snapshot(self) -> bytes:
        """The study's database as it is now, whole (SQLite's backup), for a remote driver to continue."""
        import sqlite3
        import tempfile

        with tempfile.TemporaryDirectory(prefix="runjobs-study-") as scratch:
            copy = Path(scratch) / STUDY_FILE
            source = sqlite3.connect(self.path)
            target = sqlite3.connect(copy)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
            return copy.read_bytes()

    def best(self) -> dict[str, Any] | None:
        """The best finished trial: its number, value and values; None before any finished."""
        from optuna.trial import TrialState

        finished = [trial for trial in self.trials() if trial.state is TrialState.COMPLETE]
        if not finished:
            return None
        best = self.study.best_trial
        return {"trial": best.number, "value": best.value, "params": dict(best.params)}


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise SpecError("search: {algorithm: optuna} needs Optuna: pip install 'runjobs[search]'") from None
    return optuna
