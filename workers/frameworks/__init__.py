"""The framework registry: every framework runjobs trains, and everything the control plane may know about it.

As Ray Train picks a `Backend` per framework, runjobs picks a `Framework` implementation
(workers/frameworks/base.py) by the job's `framework` field. This module is the one
place that lists frameworks: for each its name, the variants it trains, the model
formats it exports (and their file names), where its version string comes from, how
the HTML report draws it, and the module that implements it.

Importing this module imports no framework, and no Ray or numpy either: the CLI, the
spec and the reports read names, variants, formats and colours from here without paying
for TensorFlow or torch. An implementation is imported on first use, by `get(name)`,
which keeps one instance per process: a warm worker's framework object (and any state
it keeps between jobs, such as TensorFlow's traced loop) lives as long as the worker.

Adding a framework takes one new module and one entry here:

1. Write `workers/frameworks/NAME.py` with a subclass of `base.Framework` that lists the
   variants it trains in `trained_variants` and implements `initialise`,
   `train_variant`, `export_model` and `load_model` (see `torch.py` for a short one).
   Import the framework at the top of that module: only `get(NAME)` imports it.
2. Add a `FrameworkDescription` to `_BUILT_IN` below: its name, `implementation`
   ("workers.frameworks.NAME:ClassName"), its variants (reuse `SINGLE` and the other
   variant constants, or declare a new `Variant`), its formats (reuse `ONNX`, or declare
   a `ModelFormat` with its file name and how `runjobs predict` recognises a file), the
   module whose `__version__` the result reports, and its `Display`.
3. Optionally, packed sweeps: implement `train_pack` (many single-device jobs as one
   vectorised program; base.py states what it must match) and name in `packs` the models
   it vectorises; without it, the framework's jobs train one at a time.

Nothing else needs an edit: the task body (workers/entry.py), export, `runjobs predict`
and the reports (pairs, colours) ask these functions, as should any other code that
needs to know which frameworks, variants or formats exist.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: base.py imports numpy
    from workers.frameworks.base import Framework, ModelReader


class RegistryError(ValueError):
    """A framework, variant or format name the registry does not know, or an inconsistent entry."""


@dataclass(frozen=True)
class Variant:
    """One way to spread a job over devices. Frameworks that share a variant share its name and shape."""

    name: str
    # True: one Ray task owns all of the job's devices (single, mirrored). False: one Ray
    # actor per worker, reserved together by a placement group (multiworker, ddp).
    one_task: bool


@dataclass(frozen=True)
class ModelFormat:
    """A file format a framework exports (`--save-models`) and `runjobs predict` reads.

    `suffixes`, `directory_marker` and `archive_marker` tell predict, without importing
    any framework, which format a file a user names is in.
    """

    name: str
    file_name: str  # the file (or directory) inside a job's model directory
    # predict takes the lowest available in a job's model directory when --format is not
    # given: the loaders that need the least first (TorchScript needs no Python class).
    preference: int
    label: str  # how error messages name it: "SavedModel", "TorchScript"
    suffixes: tuple[str, ...] = ()  # a single file of this format ends with one of these
    directory_marker: str | None = None  # a directory of this format holds this file
    # Formats that share a suffix are zip archives told apart by an entry under this
    # folder; the one without a marker is what an archive without any marker is.
    archive_marker: str | None = None
    # A module with `load_model(path, format)` for a format that needs no framework to
    # read (ONNX: onnxruntime). None: the framework that exports it reads it.
    reader: str | None = None


@dataclass(frozen=True)
class Display:
    """How reports draw a framework: its name in prose, colours per variant, its line."""

    label: str  # "TensorFlow"
    abbreviation: str  # column headers: "train time tf/torch"
    colors: Mapping[str, str] = field(default_factory=dict)  # variant -> CSS colour
    # Frameworks that learned the same thing draw on top of each other: a wide solid line
    # under a thin dashed one keeps both visible.
    line_width: float = 2
    line_dash: str | None = None  # plotly's dash names: "dash", "dot", ...


@dataclass(frozen=True)
class FrameworkDescription:
    """One registry entry: what is known about a framework without importing it."""

    name: str
    implementation: str  # "module:ClassName", imported by get() on first use
    variants: tuple[Variant, ...]
    formats: tuple[ModelFormat, ...]
    version_module: str  # the module whose __version__ a result reports under `versions`
    display: Display
    # Whether a job that names no framework runs on this one too (TensorFlow and torch, the
    # comparison runjobs began with); others run when named.
    in_default_comparison: bool = True
    # Which models its `train_pack` vectorises (jobs/plan/packing.py): "built-in" (linear,
    # mlp) and "user" (a user's model, where the framework can vectorise arbitrary code).
    # Empty: its jobs never pack (a framework without `train_pack`).
    packs: tuple[str, ...] = ()

    @property
    def variant_names(self) -> tuple[str, ...]:
        return tuple(variant.name for variant in self.variants)

    @property
    def format_names(self) -> tuple[str, ...]:
        return tuple(model_format.name for model_format in self.formats)


SINGLE = Variant("single", one_task=True)  # one device
MIRRORED = Variant("mirrored", one_task=True)  # tf.distribute.MirroredStrategy over the task's devices
MULTIWORKER = Variant("multiworker", one_task=False)  # MultiWorkerMirroredStrategy, TF_CONFIG
DDP = Variant("ddp", one_task=False)  # a torch.distributed process group and DistributedDataParallel

# Every framework may write ONNX (with the optional converters); onnxruntime reads it,
# so predicting from an .onnx file imports no framework.
ONNX = ModelFormat(
    "onnx",
    "model.onnx",
    preference=50,
    label="ONNX",
    suffixes=(".onnx",),
    reader="workers.frameworks.onnx_format",
)

_BUILT_IN = (
    FrameworkDescription(
        name="tensorflow",
        packs=("built-in",),  # batched variables in one tf.function; a Keras model cannot vmap
        implementation="workers.frameworks.tensorflow:TensorFlowFramework",
        variants=(SINGLE, MIRRORED, MULTIWORKER),
        formats=(
            ModelFormat(
                "saved_model",
                "saved_model",
                preference=20,
                label="SavedModel",
                directory_marker="saved_model.pb",
            ),
            ModelFormat("keras", "model.keras", preference=30, label="Keras", suffixes=(".keras",)),
            ONNX,
        ),
        version_module="tensorflow",
        display=Display(
            label="TensorFlow",
            abbreviation="tf",
            colors={"single": "#ff7f0e", "mirrored": "#bcbd22", "multiworker": "#8c564b"},
            line_width=4,
        ),
    ),
    FrameworkDescription(
        name="torch",
        packs=("built-in", "user"),  # torch.func / jax.vmap vectorise any function
        implementation="workers.frameworks.torch:TorchFramework",
        variants=(SINGLE, DDP),
        formats=(
            ModelFormat(
                "torchscript",
                "model.torchscript.pt",
                preference=10,
                label="TorchScript",
                suffixes=(".pt", ".pth"),
                archive_marker="code/",  # TorchScript keeps its compiled code there
            ),
            ModelFormat(
                "state_dict", "state_dict.pt", preference=40, label="torch.save", suffixes=(".pt", ".pth")
            ),
            ONNX,
        ),
        version_module="torch",
        display=Display(
            label="torch",
            abbreviation="torch",
            colors={"single": "#1f77b4", "ddp": "#9467bd"},
            line_width=2,
            line_dash="dash",
        ),
    ),
    FrameworkDescription(
        name="jax",
        packs=("built-in", "user"),  # torch.func / jax.vmap vectorise any function
        implementation="workers.frameworks.jax:JaxFramework",
        variants=(SINGLE,),
        formats=(
            # jax.export's serialised StableHLO: a compiled program with a symbolic batch size.
            ModelFormat(
                "jax_export",
                "model.jax_export",
                preference=25,
                label="jax.export",
                suffixes=(".jax_export",),
            ),
            # The parameter arrays and each layer's activation, read with allow_pickle=False.
            ModelFormat(
                "jax_params",
                "params.npz",
                preference=45,
                label="JAX parameters",
                suffixes=(".npz",),
                archive_marker="jax_activations.npy",  # the array of the layers' activations
            ),
        ),
        version_module="jax",
        display=Display(
            label="JAX", abbreviation="jax", colors={"single": "#d62728"}, line_width=2, line_dash="dot"
        ),
        in_default_comparison=False,
    ),
)

_descriptions: dict[str, FrameworkDescription] = {}
_instances: dict[str, Framework] = {}
# Ray runs an actor's calls on one thread, but a threaded actor or a test could ask for
# the same framework twice at once; it must still get one instance.
_instances_lock = threading.Lock()


def register(description: FrameworkDescription) -> None:
    """Add a framework. Its variants and formats must agree with those of the same name already registered."""
    if description.name in _descriptions:
        raise RegistryError(
            f"framework {description.name!r} is already registered; unregister({description.name!r}) it first"
        )
    if not description.variants:
        raise RegistryError(f"framework {description.name!r} lists no variant; give it at least SINGLE")
    if ":" not in description.implementation:
        raise RegistryError(
            f"framework {description.name!r}: implementation={description.implementation!r} must be "
            "'module:ClassName', e.g. 'workers.frameworks.torch:TorchFramework'"
        )
    known_variants = {variant.name: variant for entry in _descriptions.values() for variant in entry.variants}
    for variant in description.variants:
        if variant.name in known_variants and known_variants[variant.name] != variant:
            raise RegistryError(
                f"framework {description.name!r} declares variant {variant.name!r} unlike the registered one "
                f"({known_variants[variant.name]}); reuse the registered Variant"
            )
    known_formats = {model_format.name: model_format for model_format in _all_formats()}
    for model_format in description.formats:
        registered = known_formats.get(model_format.name)
        if registered is not None and registered != model_format:
            raise RegistryError(
                f"framework {description.name!r} declares format {model_format.name!r} unlike the registered "
                "one; reuse the registered ModelFormat"
            )
        if registered is not None and model_format.reader is None:
            raise RegistryError(
                f"format {model_format.name!r} is read by {format_owner(model_format.name)} already; "
                "give the new framework's format its own name"
            )
    unknown_colors = sorted(set(description.display.colors) - set(description.variant_names))
    if unknown_colors:
        raise RegistryError(
            f"framework {description.name!r} has colours for {', '.join(unknown_colors)}, which it does not "
            f"train; its variants: {', '.join(description.variant_names)}"
        )
    _descriptions[description.name] = description


def unregister(name: str) -> None:
    """Remove a framework (and this process's instance of it)."""
    describe(name)
    del _descriptions[name]
    with _instances_lock:
        _instances.pop(name, None)


def names() -> tuple[str, ...]:
    """Every framework's name, in registration order (the order reports compare them in)."""
    return tuple(_descriptions)


def default_names() -> tuple[str, ...]:
    """The frameworks a job that names none runs on, in registration order."""
    return tuple(name for name, description in _descriptions.items() if description.in_default_comparison)


def describe(name: str) -> FrameworkDescription:
    """The registry entry of `name`, without importing the framework."""
    try:
        return _descriptions[name]
    except KeyError:
        raise RegistryError(f"framework={name!r}: choose one of {', '.join(_descriptions)}") from None


def get(name: str) -> Framework:
    """This process's instance of `name`'s implementation, importing it (and its framework) on first use."""
    description = describe(name)
    with _instances_lock:
        instance = _instances.get(name)
        if instance is None:
            module_name, _, class_name = description.implementation.partition(":")
            implementation = getattr(importlib.import_module(module_name), class_name, None)
            if implementation is None:
                raise RegistryError(
                    f"framework {name!r}: {module_name} defines no {class_name}; fix `implementation` in "
                    "its registry entry (workers/frameworks/__init__.py)"
                )
            instance = implementation(description)
            _instances[name] = instance
    return instance


def variants() -> tuple[str, ...]:
    """Every variant's name, each once, in registration order: single, mirrored, multiworker, ddp."""
    return tuple(_all_variants())


def variant(name: str) -> Variant:
    """The description of variant `name`."""
    try:
        return _all_variants()[name]
    except KeyError:
        raise RegistryError(f"variant={name!r}: choose one of {', '.join(variants())}") from None


def variants_of(framework: str) -> tuple[str, ...]:
    """The variants `framework` trains, in its own order."""
    return describe(framework).variant_names


def frameworks_for_variant(name: str) -> tuple[str, ...]:
    """The frameworks that train variant `name`, in registration order."""
    variant(name)
    return tuple(entry.name for entry in _descriptions.values() if name in entry.variant_names)


def variant_frameworks() -> dict[str, tuple[str, ...]]:
    """{variant: the frameworks that train it}, every variant in order."""
    return {name: frameworks_for_variant(name) for name in variants()}


def runs_one_task(name: str) -> bool:
    """Whether variant `name` runs as one Ray task (True) or as one Ray actor per worker (False)."""
    return variant(name).one_task


def formats(framework: str) -> tuple[str, ...]:
    """The formats `framework` exports, in its own order."""
    return describe(framework).format_names


def model_formats() -> tuple[ModelFormat, ...]:
    """Every format, each once, in registration order (framework by framework)."""
    return tuple(_all_formats())


def model_format(name: str) -> ModelFormat:
    """The description of format `name`."""
    for candidate in _all_formats():
        if candidate.name == name:
            return candidate
    raise RegistryError(f"format {name!r}: choose one of {', '.join(format_preference())}")


def format_preference() -> tuple[str, ...]:
    """Every format's name, in the order `runjobs predict` tries them in a job's model directory."""
    ordered = sorted(enumerate(_all_formats()), key=lambda item: (item[1].preference, item[0]))
    return tuple(model_format.name for _, model_format in ordered)


def format_file(name: str) -> str:
    """The file (or directory) format `name` is written to inside a job's model directory."""
    return model_format(name).file_name


def format_owner(name: str) -> str | None:
    """The framework that reads format `name`, or None when it needs none (ONNX: onnxruntime)."""
    if model_format(name).reader is not None:
        return None
    return next(entry.name for entry in _descriptions.values() if name in entry.format_names)


def reader(name: str) -> ModelReader:
    """What loads a file of format `name`: its framework's implementation, or the format's own reader module.

    Only what that format needs is imported.
    """
    owner = format_owner(name)
    if owner is not None:
        return get(owner)
    return importlib.import_module(model_format(name).reader)  # a module with load_model(path, format)


def display(framework: str) -> Display | None:
    """How reports draw `framework`; None for a name no longer registered (a record from an older run)."""
    entry = _descriptions.get(framework)
    return entry.display if entry is not None else None


def _all_variants() -> dict[str, Variant]:
    found: dict[str, Variant] = {}
    for entry in _descriptions.values():
        for item in entry.variants:
            found.setdefault(item.name, item)
    return found


def _all_formats() -> Iterable[ModelFormat]:
    seen: dict[str, ModelFormat] = {}
    for entry in _descriptions.values():
        for item in entry.formats:
            seen.setdefault(item.name, item)
    return seen.values()


for _description in _BUILT_IN:
    register(_description)
del _description
