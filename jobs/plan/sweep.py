"""Sweep spec files: YAML that expands into many jobs.

    name: lr-seed
    defaults: {epochs: 500}              # any job field
    grid: {framework: [tensorflow, torch], lr: [0.01, 0.1]}   # cartesian product
    jobs: [{framework: torch, lr: 0.05}] # optional explicit jobs, each over defaults
    repeat: 2                            # optional: each job again with seed + 1, ...
    sample: {lr: {loguniform: [0.001, 0.1]}}  # optional random search (jobs/plan/sampling.py)
    samples: 16                          # configs drawn, each with every grid point
    sample_seed: 0
    search: {algorithm: optuna, trials: 32, metric: loss.final}  # optional adaptive search
                                         # over sample: (jobs/plan/optuna_search.py)
    stopping: {rule: median, every: 10}  # optional early stopping (jobs/plan/stopping_rule.py)

Keys are job fields, the submit flags' names in snake_case. A grid point whose variant
does not belong to its framework is skipped, as `--variant` does on the command line;
a job with no framework runs once per framework. Each job's id is its framework (and
variant) plus a hash of its fields, so the same spec gives the same ids on every run:
that is what lets a re-run find the jobs it already finished.

A spec file is read defensively, since it may come from anyone: it must be a regular
UTF-8 file of at most MAX_SPEC_BYTES, its YAML may expand (through anchors and aliases)
to at most MAX_SPEC_VALUES values, and the number of jobs it names is counted from the
grid's sizes, `jobs` and `repeat` before anything is expanded, and refused above
RUNJOBS_MAX_JOBS (default DEFAULT_MAX_JOBS).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.plan import sampling
from jobs.plan.optuna_search import SearchSettings, SearchSpec, check_storable
from jobs.plan.spec import (
    DEFAULT_FRAMEWORKS,
    FIELDS,
    FRAMEWORKS,
    VARIANT_FRAMEWORKS,
    JobSpec,
    Overrides,
    SpecError,
    known_field,
    make_spec,
)
from jobs.plan.stopping_rule import StoppingRule

SPEC_KEYS = (
    "name",
    "defaults",
    "grid",
    "jobs",
    "repeat",
    "sample",
    "samples",
    "sample_seed",
    "search",
    "stopping",
)

# A hand-written sweep is a few hundred bytes, and a grid names any number of jobs in a
# few lines. PyYAML builds its Python objects at about 5 s and 120 MB per MB of YAML, so
# reading stops past 1 MiB (room for tens of thousands of listed jobs): a stray log file
# named as the spec fails at once instead of filling memory.
MAX_SPEC_BYTES = 1024 * 1024
# YAML anchors and aliases let a file of a few hundred bytes stand for billions of
# values ("billion laughs"): PyYAML shares the aliased objects, but anything that walks
# the document (str(), the job fields, the ids' JSON) expands them. A file within
# MAX_SPEC_BYTES holds at most about half a million values written out, so only
# aliases can pass a million.
MAX_SPEC_VALUES = 1_000_000
# Every job is planned, checked and kept in the ledger before any runs, so a grid of
# 10^7 points or `repeat: 1000000000` would exhaust memory (or time) while planning,
# even with --dry-run. Counted before expanding; raise it with the variable.
MAX_JOBS_VARIABLE = "RUNJOBS_MAX_JOBS"
DEFAULT_MAX_JOBS = 100_000
# SweepSpec.load's last file, by its path, inode, size and modification time.
_LOADED: dict[tuple, SweepSpec] = {}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    defaults: dict[str, Any]
    grid: dict[str, list[Any]]
    jobs: list[dict[str, Any]]
    repeat: int = 1
    sample: dict[str, sampling.Distribution] | None = None
    samples: int = 1
    sample_seed: int = 0
    search: SearchSettings | None = None
    stopping: StoppingRule | None = None

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        """The spec file, read once per version of it: planning asks for it several times
        (its jobs, its search, its stopping rule), and a large file costs seconds to parse."""
        try:
            status = path.stat()
            version = (str(path.resolve()), status.st_ino, status.st_size, status.st_mtime_ns)
        except OSError:
            version = None  # _read_document says what is wrong with it
        if version is not None and version in _LOADED:
            return _LOADED[version]
        spec = cls._parse(path)
        if version is not None:
            _LOADED.clear()  # one file at a time is all a process plans
            _LOADED[version] = spec
        return spec

    @classmethod
    def _parse(cls, path: Path) -> SweepSpec:
        document = _read_document(path)
        if not isinstance(document, dict):
            raise SpecError(f"{path}: a spec file is a mapping with keys {', '.join(SPEC_KEYS)}")
        unknown = sorted(set(document) - set(SPEC_KEYS), key=repr)  # YAML keys: text, numbers, null
        if unknown:
            raise SpecError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(SPEC_KEYS)}")
        name = document.get("name")
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int, float))):
            raise SpecError(f"{path}: name must be text, e.g. name: lr-seed")
        defaults = document.get("defaults") or {}
        grid = document.get("grid") or {}
        jobs = document.get("jobs") or []
        repeat = document.get("repeat", 1)
        if not isinstance(defaults, dict) or not isinstance(grid, dict) or not isinstance(jobs, list):
            raise SpecError(f"{path}: defaults and grid are mappings, jobs is a list")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"{path}: grid.{key} must be a non-empty list of values")
        if not all(isinstance(job, dict) for job in jobs):
            raise SpecError(f"{path}: every entry of jobs is a mapping of job fields")
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            raise SpecError(f"{path}: repeat={repeat!r} must be a whole number >= 1")
        sample = None
        samples, sample_seed = document.get("samples"), document.get("sample_seed", 0)
        if document.get("sample") is not None:
            sample = sampling.parse(str(path), document["sample"], grid)
            for key in sample:
                known_field(key)  # a misspelt field is named with the list of fields
            if samples is not None and (
                not isinstance(samples, int) or isinstance(samples, bool) or samples < 1
            ):
                raise SpecError(
                    f"{path}: samples={samples!r}: give how many configs to draw, a whole number >= 1"
                )
            if (
                not isinstance(sample_seed, int)
                or isinstance(sample_seed, bool)
                or not 0 <= sample_seed < 2**63
            ):
                raise SpecError(f"{path}: sample_seed={sample_seed!r} must be a whole number >= 0")
        elif samples is not None or "sample_seed" in document:
            raise SpecError(
                f"{path}: samples and sample_seed go with sample: (the distributions to draw from)"
            )
        search = None
        if document.get("search") is not None:
            search = SearchSettings.parse(str(path), document["search"])
            for field, distribution in (sample or {}).items():
                check_storable(f"{path}: sample.{field}", distribution)
            if sample is None:
                raise SpecError(f"{path}: search: needs sample: (the distributions it searches over)")
            if grid or jobs or repeat != 1 or samples is not None:
                raise SpecError(
                    f"{path}: a search asks for its own configs: give defaults:, sample: and search.trials, "
                    "not grid:, jobs:, repeat: or samples:"
                )
            if sample_seed >= 2**32:
                raise SpecError(
                    f"{path}: sample_seed={sample_seed}: Optuna's sampler takes a seed below 2**32"
                )
            samples = None
        elif sample is not None and samples is None:
            raise SpecError(f"{path}: samples=None: give how many configs to draw, a whole number >= 1")
        stopping = None
        if document.get("stopping") is not None:
            stopping = StoppingRule.parse(str(path), document["stopping"])
        return cls(
            str(name or path.stem),
            defaults,
            grid,
            jobs,
            repeat,
            sample,
            samples or 1,
            sample_seed,
            search,
            stopping,
        )

    def search_spec(self) -> SearchSpec | None:
        """The adaptive search this file asks for; None for a grid or random search."""
        if self.search is None:
            return None
        return SearchSpec(
            self.name, dict(self.defaults), dict(self.sample or {}), self.search, self.sample_seed
        )

    def job_count(self) -> int:
        """How many jobs `expand` builds at most, from the sizes alone: nothing is expanded.

        An upper bound: grid pairings of a framework with another's variant, and
        duplicates, are dropped only while expanding.
        """
        count = 0
        if self.grid or self.sample or not self.jobs:
            points = math.prod(len(values) for values in self.grid.values())
            count += points * (self.samples if self.sample else 1) * self._grid_frameworks()
        for job in self.jobs:
            count += 1 if "framework" in job or "framework" in self.defaults else len(DEFAULT_FRAMEWORKS)
        return count * self.repeat

    def _grid_frameworks(self) -> int:
        """How many jobs each grid point makes: one, or one per framework when none is named."""
        named = "framework" in self.grid or "framework" in self.defaults or "framework" in (self.sample or {})
        return 1 if named else len(DEFAULT_FRAMEWORKS)

    def check_size(self) -> None:
        """Refuse a sweep of more jobs than RUNJOBS_MAX_JOBS allows, before expanding it."""
        limit = max_jobs()
        count = self.job_count()
        if count <= limit:
            return
        shape = []
        if self.sample:
            shape.append(f"{self.samples} sample(s)")
        if self.grid:
            frameworks = self._grid_frameworks()
            shape.append(
                "a grid of " + " x ".join(str(len(values)) for values in self.grid.values())
                + (f" for each of {frameworks} frameworks" if frameworks > 1 else "")
            )  # fmt: skip
        if self.jobs:
            shape.append(f"{len(self.jobs)} listed job(s)")
        if self.repeat > 1:
            shape.append(f"each repeated {self.repeat} times")
        raise SpecError(
            f"sweep {self.name!r} expands to {count} jobs ({', '.join(shape) or 'one per framework'}), "
            f"more than the limit of {limit}; use fewer grid values, jobs or repeats, "
            f"or raise the limit with {MAX_JOBS_VARIABLE}={count}"
        )

    def expand(self, overrides: Overrides | None = None) -> list[tuple[str, JobSpec]]:
        """Every job of the sweep as (id, spec), in a stable order."""
        if self.search is not None:
            raise SpecError(f"sweep {self.name!r} is a search: its jobs are asked for as it runs")
        self.check_size()
        overrides = overrides or Overrides()
        points: list[dict[str, Any]] = []
        if self.grid or self.sample or not self.jobs:
            keys = list(self.grid)
            draws = sampling.draw(self.sample, self.samples, self.sample_seed) if self.sample else [{}]
            for values in itertools.product(*(self.grid[key] for key in keys)):
                for drawn in draws:
                    points.append({**self.defaults, **dict(zip(keys, values)), **drawn})
        points += [{**self.defaults, **job} for job in self.jobs]

        expanded: list[tuple[str, JobSpec]] = []
        seen: set[str] = set()
        for point in points:
            fields = {key: field_value(key, value) for key, value in point.items()}
            frameworks = [fields.pop("framework")] if "framework" in fields else list(DEFAULT_FRAMEWORKS)
            for framework in frameworks:
                # Refused here, not skipped below as a variant's wrong framework is: a YAML list
                # cannot be looked up, and a misspelt framework must not drop its jobs unnoticed.
                if framework not in FRAMEWORKS:
                    raise SpecError(f"framework={framework!r}: choose one of {', '.join(FRAMEWORKS)}")
                for repetition in range(self.repeat):
                    job_fields = {"framework": framework, **fields}
                    job_fields.update(overrides.common)
                    job_fields.update(overrides.per_framework.get(framework, {}))
                    seed = job_fields.get("seed", 0)
                    if self.repeat > 1 and isinstance(seed, int) and not isinstance(seed, bool):
                        job_fields["seed"] = seed + repetition  # any other seed is refused by JobSpec
                    variant = job_fields.get("variant", "single")
                    if variant == "single":
                        job_fields.pop("workers", None)
                    # An unknown variant (or a YAML list, which cannot be looked up) is JobSpec's to refuse.
                    known = isinstance(variant, str) and variant in VARIANT_FRAMEWORKS
                    if known and framework not in VARIANT_FRAMEWORKS[variant]:
                        continue  # a grid pairing of framework and variant that does not exist
                    spec = make_spec(job_fields)
                    job_id = sweep_job_id(spec)
                    if job_id not in seen:
                        seen.add(job_id)
                        expanded.append((job_id, spec))
        if not expanded:
            raise SpecError(
                f"sweep {self.name!r} expands to no job; check its grid's frameworks and variants"
            )
        return expanded


def trial_job(fields: dict[str, Any], overrides: Overrides, number: int) -> tuple[str, JobSpec]:
    """A search trial's one job: its fields (the file's defaults and the trial's values), then --set.

    Its id is the sweep id of its fields with the trial number after it, so two trials
    that draw the same values are two jobs.
    """
    job_fields = {key: field_value(key, value) for key, value in fields.items()}
    job_fields.update(overrides.common)
    framework = job_fields.get("framework")
    if framework is None:
        raise SpecError(
            "a search trial is one job: name its framework in defaults: or sample: "
            "(e.g. framework: {choice: [tensorflow, torch]})"
        )
    if framework not in FRAMEWORKS:
        raise SpecError(f"framework={framework!r}: choose one of {', '.join(FRAMEWORKS)}")
    job_fields.update(overrides.per_framework.get(framework, {}))
    variant = job_fields.get("variant", "single")
    if variant == "single":
        job_fields.pop("workers", None)
    if isinstance(variant, str) and framework not in VARIANT_FRAMEWORKS.get(variant, (framework,)):
        raise SpecError(
            f"variant={variant!r} is not a variant of {framework}; sample them together or not at all"
        )
    spec = make_spec(job_fields)
    return f"{sweep_job_id(spec)}-trial{number}", spec


def max_jobs() -> int:
    """The most jobs a sweep may expand to: RUNJOBS_MAX_JOBS, or DEFAULT_MAX_JOBS when unset."""
    text = os.environ.get(MAX_JOBS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_JOBS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise SpecError(
            f"{MAX_JOBS_VARIABLE}={text!r}: give a whole number of jobs >= 1 "
            f"(unset it for the default, {DEFAULT_MAX_JOBS})"
        )
    return limit


def _read_document(path: Path) -> Any:
    """The spec file's YAML document; anything unreadable or oversized is a one-line SpecError."""
    import yaml

    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise SpecError(f"{path} is {kind}; name a spec file (YAML), e.g. examples/lr-seed.yaml")
        with path.open("rb") as handle:
            content = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError(f"{path}: cannot read the spec file ({error.strerror or error})") from None
    if len(content) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{path}: larger than {MAX_SPEC_BYTES} bytes; a spec file is a short YAML mapping: "
            "name many jobs with a grid instead of listing each"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{content[error.start]:02x} at offset {error.start}); "
            "save the spec file as UTF-8"
        ) from None
    try:
        return _load_yaml(text)
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        # A reader's error spans two lines (the character, then where); the message is one.
        detail = " ".join(str(getattr(error, "problem", None) or error).split())
        raise SpecError(f"{path}{where}: not valid YAML ({detail})") from None
    except RecursionError:
        # PyYAML composes nested collections recursively: [[[[...]]]] thousands deep.
        raise SpecError(f"{path}: the YAML is nested too deeply; a spec file is a short mapping") from None
    except (ValueError, OverflowError) as error:
        # Building a value can fail after parsing: an integer of 5000 digits (past Python's
        # limit on converting them), a date such as 2017-13-45. Python's advice after the
        # ";" (raise the limit) is for programmers; the message keeps what comes before.
        detail = " ".join(str(error).split(";")[0].split())
        raise SpecError(
            f"{path}: a value cannot be read ({detail}); write it as plain text in quotes"
        ) from None


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a document that expands to more than MAX_SPEC_VALUES values.

    The document is composed first, then measured, then built: the composed node graph
    shares every aliased subtree, so measuring it costs what the file holds, not what
    it expands to.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None  # an empty file
        _check_expanded_size(node, MAX_SPEC_VALUES)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded_size(root, limit: int) -> None:
    """Refuse a node graph whose expansion (every alias replaced by its target) exceeds `limit` nodes.

    Walked without recursion, each distinct node sized once; a node reached again from
    inside itself (`&a [*a]`) is a recursive document, which no spec needs.
    """

    def children(node) -> list:
        if isinstance(node.value, list):
            return [part for item in node.value for part in (item if isinstance(item, tuple) else (item,))]
        return []  # a scalar

    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_sized = stack.pop()
        key = id(node)
        if children_sized:
            in_progress.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children(node))
            if sizes[key] > limit:
                raise SpecError(
                    f"the YAML expands to more than {limit} values through its anchors and aliases "
                    f"(line {node.start_mark.line + 1}); write the values out instead of nesting aliases"
                )
            continue
        if key in sizes:
            continue
        if key in in_progress:
            raise SpecError(
                "the YAML refers to itself (an alias inside its own anchor, "
                f"line {node.start_mark.line + 1}); a spec file holds plain values"
            )
        in_progress.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)


def field_value(key: str, value: Any) -> Any:
    """A YAML value as the job field's type; strings go through the `--set` parser."""
    return known_field(key).from_document(value)


def sweep_job_id(spec: JobSpec) -> str:
    """framework[-variant]-HASH, the hash over the fields that decide training, so equal specs share an id.

    Which fields enter the hash is each field's declaration (jobs/plan/fields.py): a field
    added after runjobs 0.1 enters it only when set, so existing ids never change. A user
    model's code enters it too (`model_digest`, the sha256 of its text): editing the file
    makes new jobs, which a re-run into the same directory runs.
    """
    from workers import models
    from workers.models import user as user_models

    fields = {key: value for key, value in spec.to_record().items() if FIELDS[key].enters_id(value)}
    if not models.is_built_in(spec.model):
        try:
            fields["model_digest"] = models.read_user_model(spec.model).digest
        except user_models.UserModelError as error:
            raise SpecError(str(error)) from None
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    base = spec.framework if spec.variant == "single" else f"{spec.framework}-{spec.variant}"
    return f"{base}-{digest}"
