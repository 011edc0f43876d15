"""The job spec: every field a job has, its validation, presets and `--set` parsing.

A `JobSpec` validates itself on construction, so a bad value is refused before any Ray
task starts. Field names are the submit flags' names in snake_case (`--batch-size` is
`batch_size`), so a flag, `--set key=value` and a spec key always mean the same thing.
This module is plain Python: importing it never imports Ray, TensorFlow or torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

FRAMEWORKS = ("tensorflow", "torch")
OPTIMIZERS = ("adam", "sgd")
VARIANTS = ("single", "mirrored", "multiworker", "ddp")
# Which framework each variant belongs to: tf.distribute for TensorFlow, DDP for torch.
VARIANT_FRAMEWORKS = {
    "single": FRAMEWORKS,
    "mirrored": ("tensorflow",),
    "multiworker": ("tensorflow",),
    "ddp": ("torch",),
}
PLACEMENTS = ("pack", "spread")
LOOPS = ("fast", "article")
INIT_KEYWORDS = ("framework", "zeros")
PRESETS = ("article",)


class SpecError(ValueError):
    """A job field has a value runjobs cannot use; the message names the field and the fix."""


@dataclass(frozen=True)
class JobSpec:
    """One training job. Defaults are the built-in comparison (article data, Adam lr 0.01)."""

    framework: str
    variant: str = "single"
    workers: int = 1
    epochs: int = 500
    optimizer: str = "adam"
    lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    batch_size: int | None = None  # None trains on the full batch
    seed: int = 0
    init: str = "zeros"  # framework | zeros | a number for every weight and the bias
    data: str = "article"
    features: tuple[str, ...] = ()  # CSV feature columns; empty means all but the target
    target: str | None = None  # CSV target column; None means the last column
    normalize: bool = False
    predict: tuple[tuple[float, ...], ...] = ()
    # The job's GPUs in all, split evenly over its workers. None: 1 per worker where the
    # cluster has GPUs, else 0.
    gpus_per_job: float | None = None
    allow_cpu_fallback: bool = False
    loop: str = "fast"  # fast: each framework's quickest path; article: Keras model.fit
    placement: str = "pack"  # how a multi-worker job's workers are spread over nodes
    setup_timeout_s: float = 60.0  # for process group / strategy set-up and each collective
    timeout_s: float | None = None  # a job still running after this long is cancelled
    retries: int = 0  # times a job whose worker or node died is started again
    retry_exceptions: bool = False  # also retry a job whose training code raised
    save_models: bool = False  # export the trained model to DIR/models/JOB (workers/export.py)

    def __post_init__(self) -> None:
        _require_choice("framework", self.framework, FRAMEWORKS)
        _require_choice("variant", self.variant, VARIANTS)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("loop", self.loop, LOOPS)
        _require_choice("placement", self.placement, PLACEMENTS)
        if not isinstance(self.save_models, bool):
            raise SpecError(f"save_models={self.save_models!r}: use true or false")
        if self.framework not in VARIANT_FRAMEWORKS[self.variant]:
            owners = " or ".join(VARIANT_FRAMEWORKS[self.variant])
            raise SpecError(
                f"variant={self.variant!r} is for {owners}, not {self.framework}; "
                f"{self.framework} variants: "
                + ", ".join(name for name, owners in VARIANT_FRAMEWORKS.items() if self.framework in owners)
            )
        _require_whole("workers", self.workers, minimum=1)
        if self.variant == "single" and self.workers != 1:
            raise SpecError(
                f"workers={self.workers}: the single variant runs exactly 1 worker; "
                "choose a multi-device variant (--variant mirrored|multiworker|ddp)"
            )
        if self.variant != "single" and self.loop != "fast":
            raise SpecError(
                f"loop={self.loop!r}: the {self.variant} variant runs the custom training loop (loop=fast); "
                "Keras model.fit under MultiWorkerMirroredStrategy fails with Keras 3"
            )
        _require_positive("setup_timeout_s", self.setup_timeout_s)
        if self.timeout_s is not None:
            _require_positive("timeout_s", self.timeout_s)
        _require_whole("retries", self.retries, minimum=0)
        _require_whole("epochs", self.epochs, minimum=1)
        _require_whole("seed", self.seed, minimum=0)
        if self.batch_size is not None:
            _require_whole("batch_size", self.batch_size, minimum=1)
        _require_positive("lr", self.lr)
        _require_positive("epsilon", self.epsilon)
        for name in ("beta_1", "beta_2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise SpecError(f"{name}={value!r}: must be a number in [0, 1)")
        if self.init not in INIT_KEYWORDS:
            try:
                initial_value = float(self.init)
            except ValueError:
                raise SpecError(f"init={self.init!r}: use framework, zeros or a number such as 0.5") from None
            if not math.isfinite(initial_value):
                raise SpecError(f"init={self.init!r}: the initial value must be finite")
        if not self.data:
            raise SpecError("data='': use article, a CSV path or synthetic:rows=N,features=K,noise=S,seed=R")
        for point in self.predict:
            if not point or not all(_is_number(value) and math.isfinite(value) for value in point):
                raise SpecError(f"predict={point!r}: each input must be finite numbers, e.g. 1800")
        if self.gpus_per_job is not None:
            gpus = self.gpus_per_job
            if not _is_number(gpus) or not math.isfinite(gpus) or gpus < 0:
                raise SpecError(f"gpus_per_job={gpus!r}: must be a number >= 0")
            if self.variant == "single" and gpus > 1:
                raise SpecError(
                    f"gpus_per_job={gpus:g}: a single-device job uses at most 1 GPU "
                    "(a fraction such as 0.5 lets two jobs share one)"
                )
            per_worker = gpus / self.workers
            one_task = self.variant in ("single", "mirrored")
            if (one_task and gpus > 1 and gpus != int(gpus)) or (not one_task and per_worker > 1):
                raise SpecError(
                    f"gpus_per_job={gpus:g} with workers={self.workers}: Ray gives a worker a fraction "
                    "of one GPU or whole GPUs; multiworker and ddp workers use at most 1 GPU each"
                )

    @property
    def runs_one_task(self) -> bool:
        """single and mirrored run as one Ray task; multiworker and ddp as one actor per worker."""
        return self.variant in ("single", "mirrored")

    @property
    def initial_value(self) -> float | None:
        """The number every parameter starts at, or None for the framework's own initialiser."""
        if self.init == "framework":
            return None
        return 0.0 if self.init == "zeros" else float(self.init)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobSpec:
        """The spec back from `to_record`'s JSON-ready fields (validated again)."""
        fields = dict(record)
        fields["features"] = tuple(fields.get("features") or ())
        fields["predict"] = tuple(tuple(point) for point in fields.get("predict") or ())
        return cls(**fields)

    def to_record(self) -> dict[str, Any]:
        """The fields as JSON-ready values, as `config` in report.json."""
        record = dataclasses.asdict(self)
        record["features"] = list(self.features)
        record["predict"] = [list(point) for point in self.predict]
        return record


FIELD_NAMES = tuple(spec_field.name for spec_field in dataclasses.fields(JobSpec))

# The article's own settings: Keras defaults for TensorFlow (Adam lr 0.001, eps 1e-7,
# batch 32, glorot-uniform init, model.fit) and the article's torch loop (Adam lr 0.01).
# The article set no seed. Its TensorFlow run learned w = -0.98, which Adam at lr 0.001
# reaches in 500 steps only from a kernel near -1.48; seed 16 gives Keras a kernel of
# -1.43, so the preset reproduces that run. Most seeds (any kernel more than about 0.5
# from 0.2) fail the same way.
ARTICLE_SEED = 16
PRESET_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "article": {
        "tensorflow": dict(
            lr=0.001, epsilon=1e-7, batch_size=32, init="framework", loop="article", seed=ARTICLE_SEED
        ),
        "torch": dict(
            lr=0.01, epsilon=1e-8, batch_size=None, init="framework", loop="article", seed=ARTICLE_SEED
        ),
    }
}


@dataclass
class Overrides:
    """Field values given on the command line, for every framework or for one."""

    common: dict[str, Any] = field(default_factory=dict)
    per_framework: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_assignment(self, assignment: str) -> None:
        """Take one `--set [FRAMEWORK.]key=value`."""
        key, separator, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not key:
            raise SpecError(f"--set {assignment!r}: use --set key=value, e.g. --set epochs=200")
        framework, dot, name = key.rpartition(".")
        if dot:
            _require_choice("--set framework prefix", framework, FRAMEWORKS)
            self.per_framework.setdefault(framework, {})[name] = parse_field(name, text.strip())
        else:
            self.common[name] = parse_field(name, text.strip())


def build_job_specs(
    frameworks: tuple[str, ...],
    overrides: Overrides,
    preset: str | None = None,
    variants: tuple[str, ...] = (),
) -> list[JobSpec]:
    """One spec per (framework, variant): defaults, then the preset, then the overrides.

    Variants pair only with their own framework (`--variant single --variant ddp` gives
    tensorflow single, torch single and torch ddp); a framework named with --framework
    that none of the variants fits is an error. `workers` applies to the multi-device
    variants; a single job always has one worker.
    """
    if preset is not None:
        _require_choice("preset", preset, PRESETS)
    for variant in variants:
        _require_choice("variant", variant, VARIANTS)
    specs = []
    for framework in frameworks or FRAMEWORKS:
        fitting = [variant for variant in variants or ("single",) if framework in VARIANT_FRAMEWORKS[variant]]
        if frameworks and not fitting:
            raise SpecError(
                f"variant {', '.join(variants)} is not for {framework}; {framework} variants: "
                + ", ".join(name for name, owners in VARIANT_FRAMEWORKS.items() if framework in owners)
            )
        for variant in fitting:
            fields: dict[str, Any] = {"framework": framework}
            if preset is not None:
                fields.update(PRESET_FIELDS[preset][framework])
            fields.update(overrides.common)
            fields.update(overrides.per_framework.get(framework, {}))
            if variants:
                fields["variant"] = variant
                if variant == "single":
                    fields.pop("workers", None)
            specs.append(make_spec(fields))
    if not specs:
        raise SpecError(f"no framework fits variant {', '.join(variants)}")
    return specs


def make_spec(fields: dict[str, Any]) -> JobSpec:
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise SpecError(f"unknown job field {unknown[0]!r}; the fields are: {', '.join(FIELD_NAMES)}")
    try:
        return JobSpec(**fields)
    except TypeError as error:  # a wrongly typed value that comparison operators reject
        raise SpecError(str(error)) from None


def job_ids(specs: list[JobSpec]) -> list[str]:
    """Each job's id: its framework (and variant, when not single), numbered when repeated."""
    bases = [
        spec.framework if spec.variant == "single" else f"{spec.framework}-{spec.variant}" for spec in specs
    ]
    seen: dict[str, int] = {}
    identifiers = []
    for base in bases:
        seen[base] = seen.get(base, 0) + 1
        identifiers.append(base if bases.count(base) == 1 else f"{base}-{seen[base]}")
    return identifiers


def parse_field(name: str, text: str) -> Any:
    """Convert the text of `--set name=text` to the field's type."""
    if name not in FIELD_NAMES:
        raise SpecError(f"unknown job field {name!r}; the fields are: {', '.join(FIELD_NAMES)}")
    try:
        if name in ("workers", "epochs", "seed", "retries"):
            return int(text)
        if name == "batch_size":
            return None if text.lower() in ("full", "none", "") else int(text)
        if name in ("lr", "beta_1", "beta_2", "epsilon", "setup_timeout_s"):
            return float(text)
        if name == "gpus_per_job":
            return None if text.lower() in ("auto", "none", "") else float(text)
        if name == "timeout_s":
            return None if text.lower() in ("none", "") else float(text)
        if name in ("normalize", "allow_cpu_fallback", "retry_exceptions", "save_models"):
            return parse_bool(name, text)
        if name == "features":
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if name == "predict":
            return tuple(parse_point(point) for point in text.split(";") if point.strip())
        if name == "target":
            return text or None
        return text
    except ValueError as error:
        if isinstance(error, SpecError):
            raise
        raise SpecError(f"{name}={text!r}: {error}") from None


def parse_point(text: str) -> tuple[float, ...]:
    """`1800` or, for several features, `1800,3`."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SpecError(f"predict {text!r}: give numbers separated by commas, e.g. 1800 or 1800,3") from None


def parse_bool(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SpecError(f"{name}={text!r}: use true or false")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name}={value!r}: choose one of {', '.join(choices)}")


def _require_whole(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{name}={value!r}: must be a whole number >= {minimum}")


def _require_positive(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"{name}={value!r}: must be a finite number > 0")
