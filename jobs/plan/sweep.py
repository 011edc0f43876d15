"""Sweep spec files: YAML that expands into many jobs.

    name: lr-seed
    defaults: {epochs: 500}              # any job field
    grid: {framework: [tensorflow, torch], lr: [0.01, 0.1]}   # cartesian product
    jobs: [{framework: torch, lr: 0.05}] # optional explicit jobs, each over defaults
    repeat: 2                            # optional: each job again with seed + 1, ...

Keys are job fields, the submit flags' names in snake_case. A grid point whose variant
does not belong to its framework is skipped, as `--variant` does on the command line;
a job with no framework runs once per framework. Each job's id is its framework (and
variant) plus a hash of its fields, so the same spec gives the same ids on every run:
that is what lets a re-run find the jobs it already finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.plan.spec import (
    FIELDS,
    FRAMEWORKS,
    VARIANT_FRAMEWORKS,
    JobSpec,
    Overrides,
    SpecError,
    known_field,
    make_spec,
)

SPEC_KEYS = ("name", "defaults", "grid", "jobs", "repeat")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    defaults: dict[str, Any]
    grid: dict[str, list[Any]]
    jobs: list[dict[str, Any]]
    repeat: int = 1

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        import yaml

        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise SpecError(f"{path}: cannot read the spec file ({error.strerror})") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise SpecError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(document, dict):
            raise SpecError(f"{path}: a spec file is a mapping with keys {', '.join(SPEC_KEYS)}")
        unknown = sorted(set(document) - set(SPEC_KEYS))
        if unknown:
            raise SpecError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(SPEC_KEYS)}")
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
        return cls(str(document.get("name") or path.stem), defaults, grid, jobs, repeat)

    def expand(self, overrides: Overrides | None = None) -> list[tuple[str, JobSpec]]:
        """Every job of the sweep as (id, spec), in a stable order."""
        overrides = overrides or Overrides()
        points: list[dict[str, Any]] = []
        if self.grid or not self.jobs:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[key] for key in keys)):
                points.append({**self.defaults, **dict(zip(keys, values))})
        points += [{**self.defaults, **job} for job in self.jobs]

        expanded: list[tuple[str, JobSpec]] = []
        seen: set[str] = set()
        for point in points:
            fields = {key: field_value(key, value) for key, value in point.items()}
            frameworks = [fields.pop("framework")] if "framework" in fields else list(FRAMEWORKS)
            for framework in frameworks:
                for repetition in range(self.repeat):
                    job_fields = {"framework": framework, **fields}
                    job_fields.update(overrides.common)
                    job_fields.update(overrides.per_framework.get(framework, {}))
                    if self.repeat > 1:
                        job_fields["seed"] = job_fields.get("seed", 0) + repetition
                    if job_fields.get("variant", "single") == "single":
                        job_fields.pop("workers", None)
                    variant = job_fields.get("variant", "single")
                    if framework not in VARIANT_FRAMEWORKS.get(variant, FRAMEWORKS):
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


def field_value(key: str, value: Any) -> Any:
    """A YAML value as the job field's type; strings go through the `--set` parser."""
    return known_field(key).from_document(value)


def sweep_job_id(spec: JobSpec) -> str:
    """framework[-variant]-HASH, the hash over the fields that decide training, so equal specs share an id.

    Which fields enter the hash is each field's declaration (jobs/plan/fields.py): a field
    added after runjobs 0.1 enters it only when set, so existing ids never change.
    """
    fields = {key: value for key, value in spec.to_record().items() if FIELDS[key].enters_id(value)}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    base = spec.framework if spec.variant == "single" else f"{spec.framework}-{spec.variant}"
    return f"{base}-{digest}"
