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

from jobs.plan.fields import (
    BATCH,
    GPUS,
    IN_ID_NEVER,
    IN_ID_UNLESS_DEFAULT,
    INIT,
    MAPPING,
    NAMES,
    NUMBER,
    OPTIONAL_TEXT,
    POINTS,
    SECONDS,
    SIZES,
    SWITCH,
    TEXT,
    WHOLE,
    SpecError,
    choice,
    declared_fields,
    job_field,
)
from workers import frameworks, models
from workers.training import TrainingJob

# The frameworks and their variants are the registry's (workers/frameworks), which names
# them without importing any framework.
FRAMEWORKS = frameworks.names()
# The frameworks a job that names none runs on: TensorFlow and torch, the original comparison.
DEFAULT_FRAMEWORKS = frameworks.default_names()
VARIANTS = frameworks.variants()
# Which frameworks each variant belongs to: tf.distribute for TensorFlow, DDP for torch.
VARIANT_FRAMEWORKS = frameworks.variant_frameworks()
OPTIMIZERS = ("adam", "sgd")
PLACEMENTS = ("pack", "spread")
LOOPS = ("fast", "article")
PACKING = ("auto", "off")  # jobs/plan/packing.py


def _packing_from_document(value: Any) -> Any:
    """YAML reads `packing: off` as false (and on, yes, true as true): the words meant."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    return value


PACKING_KIND = dataclasses.replace(choice(*PACKING), from_document=_packing_from_document)
INIT_KEYWORDS = ("framework", "zeros", "shared")
ACTIVATIONS = models.ACTIVATIONS
DTYPES = models.DTYPES
MAX_HIDDEN_LAYERS = 64
MAX_LAYER_SIZE = 2**16 - 1
# Parameters between the hidden layers: past this a job would exhaust a worker's memory
# (10^8 float32 values, with Adam's two moments, are 1.2 GB) rather than train.
MAX_HIDDEN_PARAMETERS = 10**8
# Both frameworks count in int64 and keep parameters in float32: a whole-number field past
# int64 fails the job or its report once it has run (TensorBoard's hyperparameters are
# floats), an initial value past float32's range is inf.
MAX_WHOLE = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
PRESETS = ("article",)


@dataclass(frozen=True)
class JobSpec:
    """One training job. Defaults are the built-in comparison (article data, Adam lr 0.01).

    Each field is declared here once (jobs/plan/fields.py): the submit options, `--set`,
    the spec-file keys and their help are generated from these declarations.
    """

    framework: str = job_field(
        None, choice(*FRAMEWORKS), "Framework to train with.", default_text=" and ".join(DEFAULT_FRAMEWORKS)
    )
    variant: str = job_field(
        "single",
        choice(*VARIANTS),
        "single; mirrored or multiworker (TensorFlow, tf.distribute); ddp (torch).",
    )
    workers: int = job_field(
        1, WHOLE, "Devices (mirrored) or worker processes (multiworker, ddp).", option="--workers"
    )
    epochs: int = job_field(500, WHOLE, "Passes over the data.", option="--epochs")
    optimizer: str = job_field("adam", choice(*OPTIMIZERS), "Optimizer.", option="--optimizer")
    lr: float = job_field(0.01, NUMBER, "Learning rate.", option="--lr")
    beta_1: float = job_field(0.9, NUMBER, "Adam's beta_1.")
    beta_2: float = job_field(0.999, NUMBER, "Adam's beta_2.")
    epsilon: float = job_field(1e-7, NUMBER, "Adam's epsilon.")
    batch_size: int | None = job_field(
        None, BATCH, "Rows per step.", option="--batch-size", default_text="the full data"
    )
    seed: int = job_field(0, WHOLE, "Seed for initialisation and shuffling.", option="--seed")
    init: str = job_field(
        "zeros",
        INIT,
        "Initial parameters: framework (its own initialiser), zeros, a number, or shared "
        "(drawn once in numpy, identical in every framework).",
        option="--init",
        default_text="zeros for the linear model, shared for the others",
    )
    model: str = job_field(
        "linear",
        TEXT,
        "linear, mlp, or a user model: PATH.py or an importable module defining build_tensorflow, "
        "build_torch and/or build_jax(features, config).",
        option="--model",
        in_id=IN_ID_UNLESS_DEFAULT,
    )
    hidden: tuple[int, ...] = job_field(
        (64, 64),
        SIZES,
        "The mlp's hidden layer sizes.",
        option="--hidden",
        default_text="64,64",
        in_id=IN_ID_UNLESS_DEFAULT,
    )
    activation: str = job_field(
        "relu",
        choice(*ACTIVATIONS),
        "The mlp's activation (gelu is the exact one).",
        in_id=IN_ID_UNLESS_DEFAULT,
    )
    model_args: tuple[tuple[str, Any], ...] = job_field(
        (),
        MAPPING,
        "Arguments of a user model, handed to its builder as config['model_args'].",
        default_text="none",
        in_id=IN_ID_UNLESS_DEFAULT,
    )
    dtype: str = job_field(
        "float32",
        choice(*DTYPES),
        "Precision of parameters and arithmetic.",
        option="--dtype",
        in_id=IN_ID_UNLESS_DEFAULT,
    )
    data: str = job_field(
        "article",
        TEXT,
        "article, PATH.csv or synthetic:rows=N,features=K,noise=S,seed=R[,function=linear|sine|quadratic].",
        option="--data",
    )
    features: tuple[str, ...] = job_field(
        (), NAMES, "CSV feature columns.", default_text="every column but the target"
    )
    target: str | None = job_field(None, OPTIONAL_TEXT, "CSV target column.", default_text="the last column")
    normalize: bool = job_field(
        False,
        SWITCH,
        "Standardise features and target for training; parameters are reported in original units.",
        option="--normalize",
    )
    predict: tuple[tuple[float, ...], ...] = job_field(
        (),
        POINTS,
        "Input to predict, e.g. 1800 (comma-separated for several features); repeatable.",
        option="--predict",
        default_text="1800 on the article data",
    )
    # The job's GPUs in all, split evenly over its workers.
    gpus_per_job: float | None = job_field(
        None,
        GPUS,
        "GPUs per job (0, a fraction, or 1).",
        option="--gpus-per-job",
        default_text="1 where the cluster has GPUs, else 0",
    )
    allow_cpu_fallback: bool = job_field(
        False,
        SWITCH,
        "Train on the CPU when Ray assigned a GPU that CUDA cannot use, instead of failing.",
        option="--allow-cpu-fallback",
    )
    loop: str = job_field(
        "fast",
        choice(*LOOPS),
        "fast: each framework's quickest loop with runjobs' own update rule, the same arithmetic in "
        "every framework; article: each framework's stock optimizer (Keras model.fit, torch.optim, optax).",
    )
    packing: str = job_field(
        "auto",
        PACKING_KIND,
        "auto: train single-device jobs that differ only in lr, betas, epsilon, seed or init value "
        "together, as one vectorised program per worker (each still its own job and record); "
        "off: every job trains alone.",
        option="--packing",
        in_id=IN_ID_NEVER,
    )
    placement: str = job_field(
        "pack", choice(*PLACEMENTS), "How a multi-worker job's workers are spread over nodes."
    )
    setup_timeout_s: float = job_field(
        60.0, NUMBER, "Seconds for process group or strategy set-up, and for each collective."
    )
    timeout_s: float | None = job_field(None, SECONDS, "A job still running after this long is cancelled.")
    retries: int = job_field(0, WHOLE, "Times a job whose worker or node died is started again.")
    retry_exceptions: bool = job_field(False, SWITCH, "Also retry a job whose training code raised.")
    save_models: bool = job_field(
        False,
        SWITCH,
        "Export each succeeded job's model to DIR/models/JOB (see runjobs predict).",
        option="--save-models",
        in_id=IN_ID_NEVER,
    )
    label: str | None = job_field(
        None,
        OPTIONAL_TEXT,
        "A name of your own for the job, kept in its record and its id: the same settings "
        "under another label run again as a job of their own.",
        option="--label",
        in_id=IN_ID_UNLESS_DEFAULT,
    )

    def __post_init__(self) -> None:
        _require_choice("framework", self.framework, FRAMEWORKS)
        _require_choice("variant", self.variant, VARIANTS)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("loop", self.loop, LOOPS)
        _require_choice("placement", self.placement, PLACEMENTS)
        _require_choice("packing", self.packing, PACKING)
        for declared in FIELDS.values():
            _require_kind(declared, getattr(self, declared.name))
        if self.label is not None and not (0 < len(self.label) <= 200 and self.label.isprintable()):
            raise SpecError(f"label={self.label!r}: use 1 to 200 printable characters")
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
        # Keras seeds NumPy's legacy generator too, which takes at most 2**32 - 1; a larger
        # seed would pass here and fail both frameworks' jobs once they start.
        _require_whole("seed", self.seed, minimum=0, maximum=2**32 - 1)
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
            if self.dtype == "float32" and abs(initial_value) > FLOAT32_MAX:  # torch refuses it, TF: inf
                raise SpecError(
                    f"init={self.init!r}: the parameters are float32, which holds at most "
                    f"{FLOAT32_MAX:.4g} in size; use a smaller initial value"
                )
        self._validate_model()
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

    def _validate_model(self) -> None:
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("dtype", self.dtype, DTYPES)
        if not self.model or not self.model.isprintable() or len(self.model) > 4096:
            raise SpecError(
                f"model={self.model!r}: use linear, mlp, a PATH.py or a module name such as mymodels.wide"
            )
        if self.model != "mlp":
            for name in ("hidden", "activation"):
                if getattr(self, name) != FIELDS[name].default:
                    raise SpecError(
                        f"{name}={_shown(getattr(self, name))}: applies to model=mlp, "
                        f"not model={self.model}; drop it, or set model=mlp"
                    )
        if not self.hidden or len(self.hidden) > MAX_HIDDEN_LAYERS:
            raise SpecError(
                f"hidden={_shown(self.hidden)}: give 1 to {MAX_HIDDEN_LAYERS} layer sizes, e.g. 64,64"
            )
        for size in self.hidden:
            _require_whole("hidden", size, minimum=1, maximum=MAX_LAYER_SIZE)
        between = sum(inputs * outputs for inputs, outputs in zip(self.hidden[:-1], self.hidden[1:]))
        if between > MAX_HIDDEN_PARAMETERS:
            raise SpecError(
                f"hidden={_shown(self.hidden)}: {between:,} parameters between the hidden layers, more than "
                f"the limit of {MAX_HIDDEN_PARAMETERS:,}; use smaller layers"
            )
        if models.is_built_in(self.model) and self.model_args:
            raise SpecError(
                f"model_args: arguments are for a user model's builder, not model={self.model}; drop them"
            )
        for key, value in self.model_args:
            if not _is_plain(value):
                raise SpecError(
                    f"model_args {key}={value!r}: use numbers, text, true/false, null or lists of them"
                )

    @property
    def runs_one_task(self) -> bool:
        """single and mirrored run as one Ray task; multiworker and ddp as one actor per worker."""
        return frameworks.runs_one_task(self.variant)

    @property
    def initial_value(self) -> float | None:
        """The number every parameter starts at, or None for the framework's own initialiser."""
        if self.init in ("framework", "shared"):
            return None
        return 0.0 if self.init == "zeros" else float(self.init)

    def for_worker(self) -> TrainingJob:
        """The typed object a worker trains from: only the fields that decide training."""
        return TrainingJob(
            framework=self.framework,
            variant=self.variant,
            workers=self.workers,
            epochs=self.epochs,
            optimizer=self.optimizer,
            lr=self.lr,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            batch_size=self.batch_size,
            seed=self.seed,
            initial_value=self.initial_value,
            shared_start=self.init == "shared",
            model=self.model,
            hidden=self.hidden,
            activation=self.activation,
            model_args=self.model_args,
            model_source=None if models.is_built_in(self.model) else models.read_user_model(self.model),
            dtype=self.dtype,
            normalize=self.normalize,
            predict=self.predict,
            allow_cpu_fallback=self.allow_cpu_fallback,
            loop=self.loop,
            save_models=self.save_models,
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobSpec:
        """The spec back from `to_record`'s JSON-ready fields (validated again)."""
        fields = dict(record)
        fields["features"] = tuple(fields.get("features") or ())
        fields["predict"] = tuple(tuple(point) for point in fields.get("predict") or ())
        if "hidden" in fields:
            fields["hidden"] = tuple(fields["hidden"])
        if "model_args" in fields:
            fields["model_args"] = FIELDS["model_args"].from_document(fields["model_args"] or {})
        return cls(**fields)

    def to_record(self) -> dict[str, Any]:
        """The fields as JSON-ready values, as `config` in report.json."""
        # Field by field (dataclasses.asdict deep-copies every value: 0.2 ms a job, felt at
        # 10,000 jobs); the only containers are the tuples made lists below.
        record = {name: getattr(self, name) for name in _FIELD_NAMES_IN_ORDER}
        record["features"] = list(self.features)
        record["predict"] = [list(point) for point in self.predict]
        record["hidden"] = list(self.hidden)
        record["model_args"] = {key: _plain(value) for key, value in self.model_args}
        return record


_FIELD_NAMES_IN_ORDER = tuple(field.name for field in dataclasses.fields(JobSpec))
FIELDS = {declared.name: declared for declared in declared_fields(JobSpec)}
FIELD_NAMES = tuple(FIELDS)

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

    def to_record(self) -> dict[str, Any]:
        """The overrides as JSON-ready values (what identifies a search's study)."""
        return {
            "common": {key: _plain(value) for key, value in sorted(self.common.items())},
            "per_framework": {
                framework: {key: _plain(value) for key, value in sorted(values.items())}
                for framework, values in sorted(self.per_framework.items())
            },
        }

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
    for framework in frameworks or DEFAULT_FRAMEWORKS:
        fitting = [variant for variant in variants or ("single",) if framework in VARIANT_FRAMEWORKS[variant]]
        if frameworks and not fitting:
            raise SpecError(
                f"variant {', '.join(variants)} is not for {framework}; {framework} variants: "
                + ", ".join(name for name, owners in VARIANT_FRAMEWORKS.items() if framework in owners)
            )
        for variant in fitting:
            fields: dict[str, Any] = {"framework": framework}
            if preset is not None:
                if framework not in PRESET_FIELDS[preset]:
                    raise SpecError(
                        f"--preset {preset} has settings for {' and '.join(PRESET_FIELDS[preset])} only "
                        f"(the source article's frameworks), not {framework}; drop --preset or that framework"
                    )
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
    if fields.get("model", "linear") != "linear" and "init" not in fields:
        # Zeros would leave an mlp that never trains (every hidden unit the same), and a
        # comparison of frameworks needs the same start: the shared one.
        fields = {**fields, "init": "shared"}
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
    return known_field(name).parse_text(text)


def known_field(name: str):
    """The declared field `name`; an unknown name is answered with the list of fields."""
    if name not in FIELDS:
        raise SpecError(f"unknown job field {name!r}; the fields are: {', '.join(FIELD_NAMES)}")
    return FIELDS[name]


def _is_plain(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _plain(value: Any) -> Any:
    """A model_args value as JSON: tuples back to lists."""
    return [_plain(item) for item in value] if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name}={value!r}: choose one of {', '.join(choices)}")


def _require_kind(declared, value: Any) -> None:
    """A value of the right type for its field's kind (a spec file can hold any YAML value)."""
    kind = declared.info.kind
    if kind is SWITCH and not isinstance(value, bool):
        raise SpecError(f"{declared.name}={value!r}: use true or false")
    if kind in (TEXT, INIT) and not isinstance(value, str):
        raise SpecError(f"{declared.name}={value!r}: give a {kind.name}")
    if kind is OPTIONAL_TEXT and value is not None and not isinstance(value, str):
        raise SpecError(f"{declared.name}={value!r}: give a {kind.name}")
    if kind is NAMES and not (isinstance(value, tuple) and all(isinstance(item, str) for item in value)):
        raise SpecError(f"{declared.name}={value!r}: give {kind.name}, e.g. size,rooms")
    if kind is SIZES and not (isinstance(value, tuple) and all(isinstance(item, int) for item in value)):
        raise SpecError(f"{declared.name}={value!r}: give {kind.name}, e.g. 64,64")
    if kind is MAPPING and not (
        isinstance(value, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in value)
    ):
        raise SpecError(f"{declared.name}={value!r}: give a mapping such as {{width: 3}}")
    if kind is POINTS and not (isinstance(value, tuple) and all(isinstance(item, tuple) for item in value)):
        raise SpecError(f"{declared.name}={value!r}: give {kind.name}")


def _require_whole(name: str, value: Any, minimum: int, maximum: int = MAX_WHOLE) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{name}={value!r}: must be a whole number >= {minimum}")
    if value > maximum:
        raise SpecError(f"{name}={value}: must be at most {maximum} (2**{maximum.bit_length()} - 1)")


def _require_positive(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"{name}={value!r}: must be a finite number > 0")
