"""The interface every framework implements: start on Ray's devices, train, export, load for prediction.

A job's task body (workers/entry.py) asks the registry for the job's framework and calls,
in order, `initialise` (once per job: the device for Ray's GPU assignment, and the
framework's runtime start, which counts as start-up), then `train` (which refuses a
variant the registry does not list for the framework, then calls `train_variant`, with
the job's monitor when the framework reports to one: workers/reporting.py).
With `--save-models`, rank 0 then calls `export_model` on the learned parameters;
`runjobs predict` calls `load_model` on one of the framework's formats.

Implementations work in training units and float32 arrays (workers/training.py);
scaling back to the data's units and judging the result are the task body's job, so
every framework is judged the same way. One instance lives per process (the registry
keeps it), so an implementation may keep state between the jobs of a warm worker.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from workers.distributed import SINGLE_WORKER, WorkerContext
from workers.models import ModelPlan
from workers.reporting import TrainingMonitor
from workers.training import Device, TrainerOutcome, TrainingData

if TYPE_CHECKING:
    from workers.frameworks import FrameworkDescription


class JobSettings(Protocol):
    """The job fields a framework reads; workers.training.TrainingJob, which workers get, has them.

    Declared here so that the data plane never imports the control plane's spec module.
    """

    @property
    def variant(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def beta_1(self) -> float: ...
    @property
    def beta_2(self) -> float: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def initial_value(self) -> float | None: ...
    @property
    def loop(self) -> str: ...
    @property
    def shared_start(self) -> bool: ...
    @property
    def dtype(self) -> str: ...
    @property
    def report_every(self) -> int | None: ...


@dataclass(frozen=True)
class ExportSettings:
    """What a framework's build_model reads when a model is rebuilt for export or prediction:
    exported models take and return float32, and a user's builder sees seed 0."""

    dtype: str = "float32"
    seed: int = 0


EXPORT_SETTINGS = ExportSettings()


class PackingUnsupported(Exception):
    """A pack this framework cannot train as one program (a user model it cannot vectorise).

    The task body (workers/packed.py) then trains the pack's jobs one after another, and
    their records say why.
    """


class ModelLoadError(ValueError):
    """A model file runjobs will not load; the message says what to give instead."""


@dataclass(frozen=True)
class Predictor:
    """A loaded model: how many features it takes (None when the format does not say) and its function."""

    feature_count: int | None
    predict: Callable[[np.ndarray], np.ndarray]  # float32 [rows, K] -> [rows, 1]


class ModelReader(Protocol):
    """What reads a model file: a framework for its own formats, or a reader module (ONNX)."""

    def load_model(self, path: Path, format: str) -> Predictor: ...


class Framework(ABC):
    """One framework's implementation; `workers.frameworks.get(name)` returns this process's instance.

    A subclass lists in `trained_variants` every variant `train_variant` handles; the
    registry entry (its `description`) may not name a variant outside them.
    """

    trained_variants: ClassVar[tuple[str, ...]] = ()
    # Whether `train_variant` takes a `monitor` and, when the job sets `report_every`,
    # reports its loss to it between chunks of epochs and stops when told to. A framework
    # that does not trains every job whole: its jobs are never stopped early.
    reports_progress: ClassVar[bool] = False

    # Whether `train_pack` trains many single-device jobs as one vectorised program.
    packs: ClassVar[bool] = False

    def __init__(self, description: FrameworkDescription) -> None:
        unsupported = [name for name in description.variant_names if name not in self.trained_variants]
        if unsupported:
            raise TypeError(
                f"{type(self).__name__} does not train {', '.join(unsupported)}, which the registry lists "
                f"for {description.name}; add them to its trained_variants (and train_variant), or drop "
                "them from its registry entry"
            )
        self.description = description

    @property
    def name(self) -> str:
        return self.description.name

    @property
    def version(self) -> str:
        """The framework's version, a plain str (a result is unpickled in a driver without the framework)."""
        return str(importlib.import_module(self.description.version_module).__version__)

    @abstractmethod
    def initialise(
        self,
        gpu_ids: tuple[str, ...],
        allow_cpu_fallback: bool,
        spec: JobSettings,
        context: WorkerContext = SINGLE_WORKER,
    ) -> Device:
        """Configure the framework for Ray's GPU assignment, start its runtime, and return the device.

        Ray sets CUDA_VISIBLE_DEVICES for the task, so an assigned GPU is device 0 here;
        with no `gpu_ids` the framework must stay off the node's GPUs. When a GPU was
        assigned but the framework sees none, raise workers.devices.DeviceUnavailableError
        unless `allow_cpu_fallback` (workers.devices.choose_device does both).
        """

    def train(
        self,
        spec: JobSettings,
        model: ModelPlan,
        data: TrainingData,
        device: Device,
        context: WorkerContext = SINGLE_WORKER,
        monitor: TrainingMonitor | None = None,
    ) -> TrainerOutcome:
        """Train `model` as `spec` says on `data` as worker `context`; refuses a variant it lacks.

        With a `monitor`, a framework that `reports_progress` reports to it every
        `spec.report_every` epochs; others ignore it.
        """
        if spec.variant not in self.description.variant_names:
            raise ValueError(
                f"variant={spec.variant!r} is not a {self.name} variant; choose one of "
                f"{', '.join(self.description.variant_names)}"
            )
        if monitor is not None and self.reports_progress:
            return self.train_variant(spec, model, data, device, context, monitor=monitor)
        return self.train_variant(spec, model, data, device, context)

    @abstractmethod
    def train_variant(
        self,
        spec: JobSettings,
        model: ModelPlan,
        data: TrainingData,
        device: Device,
        context: WorkerContext,
        monitor: TrainingMonitor | None = None,
    ) -> TrainerOutcome:
        """Train a job of `spec.variant` (one of `trained_variants`), in training units.

        The outcome's parameters are in the canonical layout (workers/models/__init__.py);
        with `spec.shared_start` the model starts from workers.models.shared_start's draw;
        under `loop=fast` the update is workers/update_rules.py's, written in the framework.
        A framework that `reports_progress` trains in the chunks of
        workers.reporting.ReportSchedule when `monitor` and `spec.report_every` are set,
        reports after each, and stops when the monitor says so (`stopped_at_epoch`); the
        chunks compute what the whole run computes.
        """

    def train_pack(
        self, specs: Sequence[JobSettings], model: ModelPlan, data: TrainingData, device: Device
    ) -> list[TrainerOutcome]:
        """Train single-device jobs that share everything but what can be vectorised, as one program.

        The specs share model, data, dtype, optimizer, loop (`fast`), batch size, epochs and
        how parameters start (shared start, one value, or the framework's initialiser);
        they may differ in lr, beta_1, beta_2, epsilon, seed and initial_value
        (jobs/plan/packing.py decides). Parameters are stacked along a leading axis, one
        entry a job, each with its own hyperparameters, its own start (drawn from its own
        seed) and its own shuffle order (the one it draws alone), and nothing is reduced
        across jobs, so a job that diverges leaves the others untouched.

        Returns one outcome a spec, in order, each what `train_variant` returns for that
        spec alone up to float rounding (the tests hold packed and unpacked runs to 1e-5
        relative in float32, 1e-10 in float64). Every outcome carries the pack's set-up,
        train and predict seconds and the pack's per-epoch seconds; the task body divides
        them. Raises PackingUnsupported for a model it cannot vectorise.
        """
        raise PackingUnsupported(f"{self.name} does not train packs")

    @abstractmethod
    def export_model(self, plan: ModelPlan, parameters: list[np.ndarray], directory: Path) -> dict[str, str]:
        """Write `plan` with `parameters` (canonical layout) in every format of the framework's entry.

        Each format goes at its `file_name`; exported models take and return float32.

        Returns the formats not written, each with the reason (an optional converter
        that is missing); a format that should have been written and fails raises.
        """

    @abstractmethod
    def model_loaders(self) -> Mapping[str, Callable[[Path], Predictor]]:
        """Each of the framework's own formats and the function that loads a file of it.

        A loader never unpickles untrusted data, and raises ModelLoadError, with what to
        give instead, for a file runjobs refuses.
        """

    def load_model(self, path: Path, format: str) -> Predictor:
        """Load a model file of one of the framework's formats."""
        loaders = self.model_loaders()
        if format not in loaders:
            raise ModelLoadError(
                f"{path}: {self.description.display.label} reads {', '.join(loaders)} models, not {format}"
            )
        return loaders[format](path)

    def load_with_code(self, path: Path, format: str, plan: ModelPlan) -> Predictor:
        """Load a user model's file of `format` by running its code (`runjobs predict --trust-code`).

        Only for the formats that cannot be read without the user's builder (a state_dict,
        a SavedModel's graph, JAX's parameters); `plan` carries the code, checked against
        the digest the model was saved with.
        """
        raise ModelLoadError(f"{path}: {self.name} has no use for --trust-code with {format} files")

    def format_path(self, directory: Path, format: str) -> Path:
        """Where format `format` goes inside a job's model directory."""
        if format not in self.description.format_names:
            raise ValueError(
                f"format {format!r} is not a {self.name} format; choose one of "
                f"{', '.join(self.description.format_names)}"
            )
        return directory / next(item.file_name for item in self.description.formats if item.name == format)
