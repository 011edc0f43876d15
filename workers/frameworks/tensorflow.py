"""TensorFlow: the job's model (Keras Dense layers, or a user's Keras model) on the devices Ray assigned.

One training function serves every variant; what differs between them is one small
strategy object each (`VARIANT_STRATEGIES`): `single` runs under TensorFlow's default
strategy pinned to the job's device, `mirrored` under MirroredStrategy over the task's
devices, `multiworker` under MultiWorkerMirroredStrategy with TF_CONFIG from the worker
context. Two loops: `fast` runs every epoch inside one compiled tf.function (autograph
turns the epoch loop into a tf.while_loop, so 500 epochs are one graph call) and updates
with runjobs' own rule (workers/update_rules.py, the same arithmetic as the other
frameworks); `article` calls Keras `model.fit` with Keras's optimizer, as the source
article does (single only). A job that reports its loss (workers/reporting.py) calls the
same compiled loop once per chunk of epochs, or, under `article`, reports from a Keras
callback that ends `fit` when told to stop.

A pack of single-device jobs (workers/packed.py) trains as one compiled loop over
batched variables: every parameter carries the pack's jobs on a leading axis, each job
with its own hyperparameters, start and shuffle order (`train_pack`).

A warm worker keeps its `TensorFlowFramework` (the registry holds one per process), and
with it the last traced single-device loop and the last traced pack, which the next job
or pack of the same shape reuses.

Exports a SavedModel, a .keras file, and ONNX when tf2onnx is installed; reads SavedModel
(a graph) and .keras (in Keras' safe mode) back. Importing this module imports
TensorFlow; the registry imports it only for a job, export or prediction that needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

# Keep TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) out of job output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _import_tensorflow():
    """Import TensorFlow without the optional packages its import pulls in when installed.

    TFLite's util tries `from jax import jit`, Keras's sklearn wrappers `import sklearn`
    and its array adapters `import pandas`, each inside try/except ImportError. Where
    jax, scikit-learn or pandas are installed (the jax and mlflow extras bring them), that
    is ~2 s of a 4-6 s import on a job's start-up, for features runjobs never uses. They
    are hidden during the import only, so a user's model may import them afterwards; but
    the TensorFlow and Keras modules that probed for them keep their answer for the life of
    the worker: Keras' pandas input adapters, its scikit-learn wrappers and TFLite's JAX
    converter stay off in runjobs' TensorFlow workers.
    """
    import sys

    hidden = [name for name in ("jax", "sklearn", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError
    try:
        import tensorflow
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return tensorflow


tf = _import_tensorflow()

from workers.devices import choose_device  # noqa: E402
from workers.distributed import SINGLE_WORKER, WorkerContext  # noqa: E402
from workers.frameworks import FrameworkDescription  # noqa: E402
from workers.frameworks.base import (  # noqa: E402
    EXPORT_SETTINGS,
    Framework,
    JobSettings,
    ModelLoadError,
    PackingUnsupported,
    Predictor,
)
from workers.frameworks.onnx_format import ONNX_OPSET, one_line, write_checked  # noqa: E402
from workers.models import ModelPlan  # noqa: E402
from workers.models import user as user_models  # noqa: E402
from workers.models.shared_start import describe_layout, draw  # noqa: E402
from workers.reporting import ReportSchedule, TrainingMonitor  # noqa: E402
from workers.training import Device, TrainerOutcome, TrainingData, batch_size_for  # noqa: E402
from workers.update_rules import OWN_RULE, stock_rule  # noqa: E402

keras = tf.keras


class VariantStrategy(ABC):
    """Everything one variant changes in a TensorFlow job; the training loop itself is shared."""

    # The public tf.distribute name reported as the result's `strategy`
    # (MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy); None: not distributed.
    strategy_name: str | None = None
    # Pin the model's variables to the job's device. A distribution strategy places them itself.
    pins_to_device = False
    # Whether the traced loop may be kept for the next job in this process (see _CompiledLoop).
    reuses_traced_loop = False

    def task_devices(self, spec: JobSettings) -> int:
        """How many devices this task drives (and, without GPUs, how many logical CPUs to split)."""
        return 1

    @abstractmethod
    def create(self, device: Device, context: WorkerContext) -> tf.distribute.Strategy:
        """The tf.distribute strategy to build the model and run the loop under."""


class SingleDevice(VariantStrategy):
    """`single`: TensorFlow's default strategy, the variables pinned to the job's one device."""

    pins_to_device = True
    reuses_traced_loop = True

    def create(self, device: Device, context: WorkerContext) -> tf.distribute.Strategy:
        return tf.distribute.get_strategy()


class Mirrored(VariantStrategy):
    """`mirrored`: one task, one replica per device it owns (`workers` of them)."""

    strategy_name = "MirroredStrategy"

    def task_devices(self, spec: JobSettings) -> int:
        return spec.workers

    def create(self, device: Device, context: WorkerContext) -> tf.distribute.Strategy:
        return tf.distribute.MirroredStrategy(devices=list(device.replica_names))


class MultiWorker(VariantStrategy):
    """`multiworker`: one device per Ray actor, the actors joined through TF_CONFIG."""

    strategy_name = "MultiWorkerMirroredStrategy"

    def create(self, device: Device, context: WorkerContext) -> tf.distribute.Strategy:
        os.environ["TF_CONFIG"] = context.tf_config()
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if device.name != "cpu"
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, timeout_seconds=context.setup_timeout_s
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


VARIANT_STRATEGIES: dict[str, VariantStrategy] = {
    "single": SingleDevice(),
    "mirrored": Mirrored(),
    "multiworker": MultiWorker(),
}


class OwnUpdateRule:
    """workers/update_rules.py's Adam and SGD in TensorFlow operations, its state in variables.

    Created under the job's strategy scope, so the moments are mirrored like the model's
    variables; `apply` runs in cross-replica context on the summed gradients, so every
    replica applies the same update. The learning rate is a variable: a reused traced
    loop takes the next job's.
    """

    def __init__(self, spec: JobSettings, variables, dtype) -> None:
        self.optimizer = spec.optimizer
        self.beta_1 = tf.constant(spec.beta_1, dtype)
        self.beta_2 = tf.constant(spec.beta_2, dtype)
        self.epsilon = tf.constant(spec.epsilon, dtype)
        self.learning_rate = tf.Variable(spec.lr, dtype=dtype, trainable=False)
        self.step_number = tf.Variable(0.0, dtype=dtype, trainable=False)
        self.first = [tf.Variable(tf.zeros_like(variable), trainable=False) for variable in variables]
        self.second = [tf.Variable(tf.zeros_like(variable), trainable=False) for variable in variables]

    def reset(self, spec: JobSettings) -> None:
        self.learning_rate.assign(spec.lr)
        self.step_number.assign(0.0)
        for slot in (*self.first, *self.second):
            slot.assign(tf.zeros_like(slot))

    def apply(self, variables, gradients) -> None:
        if self.optimizer == "sgd":
            for variable, gradient in zip(variables, gradients):
                variable.assign_sub(self.learning_rate * gradient)
            return
        self.step_number.assign_add(1.0)
        one = tf.constant(1.0, self.beta_1.dtype)
        correction_1 = one - tf.pow(self.beta_1, self.step_number)
        correction_2 = one - tf.pow(self.beta_2, self.step_number)
        for variable, gradient, first, second in zip(variables, gradients, self.first, self.second):
            first.assign(self.beta_1 * first + (one - self.beta_1) * gradient)
            second.assign(self.beta_2 * second + (one - self.beta_2) * gradient * gradient)
            update = (
                self.learning_rate * (first / correction_1) / (tf.sqrt(second / correction_2) + self.epsilon)
            )
            variable.assign_sub(update)


@dataclass
class _CompiledLoop:
    """A traced training loop with the model and update rule it uses, kept for the next job."""

    key: tuple
    model: Any
    rule: OwnUpdateRule
    run: Any  # ConcreteFunction: (epochs, seed, first epoch) -> (losses, parameters, stamps)

    def reset(self, spec: JobSettings, initial_model) -> None:
        """Start a new job: its own initial parameters, a fresh optimizer state, its learning rate."""
        for variable, value in zip(self.model.trainable_variables, initial_model.trainable_variables):
            variable.assign(value)
        self.rule.reset(spec)


class _PackSettings(NamedTuple):
    """A pack's update-rule settings, one entry a job ([jobs] vectors), as its traced loop takes them."""

    learning_rate: Any
    beta_1: Any
    beta_2: Any
    epsilon: Any
    # Every distinct beta of the pack, and where each job's beta_1 and beta_2 are among them:
    # the bias corrections' powers are computed once a distinct beta (see _packed_update).
    betas: Any
    beta_1_index: Any
    beta_2_index: Any


@dataclass
class _PackedLoop:
    """A traced packed training loop, kept for the next pack of the same key."""

    key: tuple
    run: Any  # ConcreteFunction: (parameters, seeds, settings, epochs) -> (losses, learned, history, stamps)


class TensorFlowFramework(Framework):
    """TensorFlow behind the framework interface; one instance per process keeps the traced loop."""

    trained_variants = tuple(VARIANT_STRATEGIES)
    reports_progress = True
    packs = True

    def __init__(self, description: FrameworkDescription) -> None:
        super().__init__(description)
        # A warm worker runs many single-device jobs, and tracing the loop is most of a
        # job's set-up (about 0.1-0.2 s against 10 ms for building the model). Jobs that
        # differ only in learning rate, seed, initial parameters or epochs reuse the last
        # traced loop: those enter it as variables or arguments. One entry, so a worker
        # holds one job's data at most.
        self._last_loop: _CompiledLoop | None = None
        # The same for packs: the pack's size is part of its key.
        self._last_pack: _PackedLoop | None = None

    @property
    def traced_loop(self) -> _CompiledLoop | None:
        """The traced loop kept for the next job, if the last job left one."""
        return self._last_loop

    def initialise(
        self,
        gpu_ids: tuple[str, ...],
        allow_cpu_fallback: bool,
        spec: JobSettings,
        context: WorkerContext = SINGLE_WORKER,
    ) -> Device:
        """Configure TensorFlow's devices for Ray's assignment before the runtime starts."""
        device_count = VARIANT_STRATEGIES[spec.variant].task_devices(spec)
        gpus = tf.config.list_physical_devices("GPU")
        try:
            if not gpu_ids:
                # Ray gave this job no GPU: keep TensorFlow off any GPU the node has.
                tf.config.set_visible_devices([], "GPU")
                gpus = []
            else:
                # Memory growth lets a TensorFlow job share its GPU with another job
                # instead of reserving nearly all of the GPU's memory at start.
                for gpu in gpus:
                    tf.config.experimental.set_memory_growth(gpu, True)
            if device_count > 1 and not gpus:
                # MirroredStrategy without GPUs: split the CPU into logical devices, one a replica.
                cpu = tf.config.list_physical_devices("CPU")[0]
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(device_count)]
                )
        except RuntimeError:
            # The runtime is already initialised: a reused worker that configured it before.
            pass
        device = choose_device(
            "tensorflow",
            gpu_ids,
            len(gpus),
            "/GPU:0",
            allow_cpu_fallback,
            f"TensorFlow {self.version} built with CUDA: {tf.test.is_built_with_cuda()}",
        )
        if device_count > 1:
            kind = "CPU" if device.name == "cpu" else "GPU"
            names = tuple(logical.name for logical in tf.config.list_logical_devices(kind))[:device_count]
            if len(names) < device_count:
                raise RuntimeError(
                    f"the {spec.variant} variant needs {device_count} {kind} devices but this worker has "
                    f"{len(names)}; TensorFlow was initialised before runjobs could configure it"
                )
            device = Device(device.name, device.gpu_ids, device.cpu_fallback, names)
        if not context.is_distributed:
            # Start the runtime now, so its cost counts as start-up. Not for multiworker:
            # MultiWorkerMirroredStrategy must be created before the runtime starts.
            with tf.device(_placement(device)):
                tf.zeros(1).numpy()
        return device

    def train_variant(
        self,
        spec: JobSettings,
        plan: ModelPlan,
        data: TrainingData,
        device: Device,
        context: WorkerContext,
        monitor: TrainingMonitor | None = None,
    ) -> TrainerOutcome:
        setup_started = time.perf_counter()
        schedule = ReportSchedule.for_job(spec, monitor)
        variant_strategy = VARIANT_STRATEGIES[spec.variant]
        strategy = variant_strategy.create(device, context)
        pinned = (
            tf.device(_placement(device)) if variant_strategy.pins_to_device else contextlib.nullcontext()
        )
        with strategy.scope(), pinned:
            if (spec.initial_value is None and not spec.shared_start) or spec.loop == "article":
                # The seed decides Keras's own initial kernel (and fit's shuffling). Otherwise
                # it is skipped: tf.random.set_seed clears the eager context's caches, which
                # costs a reused traced loop its instantiation again (about 45 ms a job here);
                # the compiled loop's shuffle takes the seed explicitly.
                keras.utils.set_random_seed(spec.seed)
            model = build_model(spec, plan)
            if plan.user is not None:  # the loss reshapes outputs to [-1, 1], which would hide [rows, 3]
                probe = data.features[:2]
                shape = model(probe, training=False).shape
                user_models.check_output_shape(plan.user, "tensorflow", shape, len(probe))
            initialise_parameters(spec, plan, model)
            if spec.loop == "article":
                outcome = _fit_loop(spec, plan, data, model, schedule, setup_started)
            else:
                outcome = self._compiled_loop(
                    spec, plan, data, model, strategy, device, variant_strategy, schedule, setup_started
                )
        outcome.stopped_at_epoch = schedule.stopped_at_epoch
        if variant_strategy.strategy_name is not None:
            outcome.distribution = {
                "strategy": variant_strategy.strategy_name,
                "devices": list(strategy.extended.worker_devices),
            }
        return outcome

    def _compiled_loop(
        self,
        spec,
        plan,
        data,
        model,
        strategy,
        device,
        variant_strategy: VariantStrategy,
        schedule: ReportSchedule,
        setup_started,
    ) -> TrainerOutcome:
        reusable = variant_strategy.reuses_traced_loop
        key = _loop_key(spec, plan, data, device) if reusable else None
        if reusable and self._last_loop is not None and self._last_loop.key == key:
            self._last_loop.reset(spec, model)
            loop = self._last_loop
        else:
            rule = OwnUpdateRule(spec, model.trainable_variables, tf.as_dtype(spec.dtype))
            one_device = variant_strategy.strategy_name is None
            loop = _CompiledLoop(
                key, model, rule, _trace(spec, plan, data, model, rule, strategy, one_device)
            )
            self._last_loop = loop if reusable else None
        setup_s = time.perf_counter() - setup_started

        train_started = time.perf_counter()
        seed = tf.constant(spec.seed, tf.int64)
        loss_parts, parameter_parts, second_parts = [], [], []
        # One call for the whole run, or one per chunk of a job that reports: the rule's
        # state lives in variables and the shuffle is keyed by the absolute epoch, so the
        # chunks compute what the whole run computes.
        for first, last in schedule.chunks():
            losses, parameters, stamps = loop.run(tf.constant(last - first), seed, tf.constant(first))
            loss_parts.append(losses.numpy())
            parameter_parts.append(parameters.numpy())
            second_parts.append(np.diff(stamps.numpy()))
            if schedule.stop_after(last, loss_parts[-1][-1]):
                break
        losses, parameters, seconds = (
            np.concatenate(parts) for parts in (loss_parts, parameter_parts, second_parts)
        )
        train_s = time.perf_counter() - train_started

        predictions, predict_s = _predict(loop.model, data.prediction_inputs, use_keras_predict=False)
        return _outcome(
            plan,
            data,
            loop.model,
            losses.tolist(),
            parameters if plan.is_linear else None,
            seconds.tolist(),
            predictions,
            setup_s,
            train_s,
            predict_s,
            OWN_RULE[spec.optimizer],
        )

    def train_pack(
        self, specs: Sequence[JobSettings], plan: ModelPlan, data: TrainingData, device: Device
    ) -> list[TrainerOutcome]:
        """Train the jobs as one compiled loop over batched variables (see _trace_pack)."""
        setup_started = time.perf_counter()
        first = specs[0]
        if plan.user is not None:
            raise PackingUnsupported(
                "TensorFlow cannot vectorise a user's Keras model across jobs; its jobs train one at a time"
            )
        if first.loop != "fast":
            raise PackingUnsupported(f"loop={first.loop} trains with Keras's fit, one job at a time")
        unlike = [spec for spec in specs if _shared_fields(spec) != _shared_fields(first)]
        if unlike:
            raise ValueError(
                f"a pack's jobs must share {', '.join(PACK_SHARED)} and whether Keras initialises them; "
                f"{len(unlike)} of {len(specs)} differ from the first "
                f"({_shared_fields(first)} vs {_shared_fields(unlike[0])})"
            )
        dtype = tf.as_dtype(first.dtype)
        with tf.device(_placement(device)):
            parameters = [tf.constant(values) for values in _member_starts(specs, plan)]
            seeds = tf.constant([spec.seed for spec in specs], tf.int64)
            settings = _rule_settings(specs, dtype)
            key = (len(specs), *_shape_key(first, plan, data, device))
            if self._last_pack is None or self._last_pack.key != key:
                self._last_pack = _PackedLoop(key, _trace_pack(first, plan, data, len(specs)))
            setup_s = time.perf_counter() - setup_started

            train_started = time.perf_counter()
            losses, learned, history, stamps = self._last_pack.run(
                parameters, seeds, settings, tf.constant(first.epochs)
            )
            losses, history, seconds = losses.numpy(), history.numpy(), np.diff(stamps.numpy()).tolist()
            train_s = time.perf_counter() - train_started

            predict_started = time.perf_counter()
            predictions = _packed_forward(plan, learned, tf.constant(data.prediction_inputs)).numpy()
            predict_s = time.perf_counter() - predict_started
            fitted = None if plan.is_linear else _packed_forward(plan, learned, tf.constant(data.features))
        learned = [np.asarray(values, dtype=np.float64) for values in learned]
        return [
            TrainerOutcome(
                parameters=[values[index] for values in learned],
                loss_history=losses[:, index].tolist(),
                epoch_seconds=list(seconds),
                parameter_history=history[:, index].astype(np.float64) if plan.is_linear else None,
                predictions=predictions[index].reshape(-1),
                setup_s=setup_s,
                train_s=train_s,
                predict_s=predict_s,
                fitted=None if fitted is None else np.asarray(fitted[index], dtype=np.float64).reshape(-1),
                parameter_names=[name for name, _ in plan.layout],
                update_rule=OWN_RULE[first.optimizer],
            )
            for index in range(len(specs))
        ]

    def export_model(self, plan: ModelPlan, parameters: list[np.ndarray], directory: Path) -> dict[str, str]:
        # Keras 3 itself (not tf.keras's lazy loader): its save and export write the files.
        import keras as keras_package

        feature_count = plan.feature_count
        not_written: dict[str, str] = {}
        if plan.user is None:
            model = keras_package.Sequential(
                [keras_package.Input((feature_count,), dtype="float32", name="features")]
                + [
                    keras_package.layers.Dense(layer.outputs, activation=layer.activation)
                    for layer in plan.layers
                ]
            )
            _assign_parameters(model, plan, parameters)
            model.save(self.format_path(directory, "keras"))
        else:
            model = _user_model_for_export(plan)
            _assign_parameters(model, plan, parameters)
            try:
                # The user's layers may not serialise (a custom layer without get_config):
                # the other formats do not need them to, so the job keeps its model.
                model.save(self.format_path(directory, "keras"))
            except Exception as error:
                self.format_path(directory, "keras").unlink(missing_ok=True)
                not_written["keras"] = f"Keras could not save {plan.user.name}: {one_line(error)}"
        # Keras 3's export writes a SavedModel whose `serving_default` signature takes
        # float32 [None, K] under the input's name, `features`.
        signature = (tf.TensorSpec((None, feature_count), tf.float32, name="features"),)
        model.export(
            str(self.format_path(directory, "saved_model")),
            format="tf_saved_model",
            verbose=False,
            input_signature=list(signature),
        )

        onnx_path = self.format_path(directory, "onnx")

        def convert() -> None:
            import tf2onnx

            # tf2onnx's from_keras does not know Keras 3 models; a tf.function around the
            # model converts the same graph (a dense stack's written out, see _onnx_forward).
            serve = tf.function(_onnx_forward(model, plan), input_signature=signature)
            tf2onnx.convert.from_function(
                serve, input_signature=signature, opset=ONNX_OPSET, output_path=str(onnx_path)
            )

        reason = write_checked(
            "tf2onnx",
            ("onnx", "tf2onnx"),
            onnx_path,
            convert,
            feature_count,
            lambda rows: model(rows).numpy(),
        )
        return not_written if reason is None else {**not_written, "onnx": reason}

    def load_with_code(self, path: Path, format: str, plan: ModelPlan) -> Predictor:
        if format != "saved_model":
            return super().load_with_code(path, format, plan)
        # The user asked for it: the SavedModel's graph runs (its serving signature).
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]

        def predict(features: np.ndarray):
            outputs = serve(tf.constant(features, tf.float32))
            return np.asarray(next(iter(outputs.values()))).reshape(-1, 1)

        return Predictor(plan.feature_count, predict)

    def model_loaders(self) -> dict[str, Callable[[Path], Predictor]]:
        return {"saved_model": _load_saved_model, "keras": _load_keras}


ACTIVATIONS = ("relu", "tanh", "gelu")  # Keras 3's gelu is the exact (erf) one, as torch's


def build_model(spec: JobSettings, plan: ModelPlan):
    """The plan as a Keras model: a Sequential of Dense layers, or what the user's builder returns."""
    if plan.user is not None:
        model = user_models.build(plan, "tensorflow", user_models.builder_config(spec))
        if not isinstance(model, keras.Model):
            raise user_models.wrong_return(plan.user, "tensorflow", model, "a keras.Model")
        return model
    return keras.Sequential(
        [keras.Input(shape=(plan.feature_count,), dtype=spec.dtype)]
        + [
            keras.layers.Dense(layer.outputs, activation=layer.activation, dtype=spec.dtype)
            for layer in plan.layers
        ]
    )


def layout_of(model) -> list[tuple[str, tuple[int, ...]]]:
    """A Keras model's parameters: a Dense kernel is already [inputs, outputs], the canonical layout."""
    return [(variable.path, tuple(variable.shape)) for variable in model.trainable_variables]


def initialise_parameters(spec: JobSettings, plan: ModelPlan, model) -> None:
    """The shared start, every parameter at one value, or (init=framework) Keras's own initialisers."""
    variables = model.trainable_variables
    if spec.shared_start:
        layout = layout_of(model)
        if plan.user is None and [shape for _, shape in layout] != [shape for _, shape in plan.layout]:
            raise ValueError(
                f"the Keras model's parameters ({describe_layout(layout)}) do not match the plan's "
                f"({describe_layout(plan.layout)})"
            )
        for variable, values in zip(variables, draw([shape for _, shape in layout], spec.seed, spec.dtype)):
            variable.assign(values)
    elif spec.initial_value is not None:
        for variable in variables:
            variable.assign(np.full(variable.shape, spec.initial_value, dtype=spec.dtype))


def _stock_optimizer(spec: JobSettings):
    if spec.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=spec.lr)
    return keras.optimizers.Adam(
        learning_rate=spec.lr, beta_1=spec.beta_1, beta_2=spec.beta_2, epsilon=spec.epsilon
    )


def _loop_key(spec: JobSettings, plan: ModelPlan, data: TrainingData, device: Device) -> tuple:
    """What a traced loop is specialised on: a job that differs in any of these traces its own."""
    return (spec.beta_1, spec.beta_2, spec.epsilon, *_shape_key(spec, plan, data, device))


def _shape_key(spec: JobSettings, plan: ModelPlan, data: TrainingData, device: Device) -> tuple:
    """What a job's traced loop and a pack's share: the model, the data and how it is cut, the device."""
    return (
        repr(plan),
        spec.dtype,
        spec.optimizer,
        batch_size_for(spec.batch_size, data.rows),
        device.name,
        data.features.shape,
        hashlib.blake2b(data.features.tobytes() + data.target.tobytes(), digest_size=16).digest(),
    )


def _trace(spec, plan, data, model, rule: OwnUpdateRule, strategy, one_device: bool):
    """The whole run as one compiled function of (epochs, seed, first epoch); tracing it is set-up.

    It trains `epochs` epochs numbered from `first epoch` (0 for a whole run; a chunk of a
    job that reports starts where the last chunk ended), so one traced loop serves both.

    On one device the step applies its gradients directly; under a distribution strategy
    each replica's gradients are summed through the strategy first. The arithmetic is the
    same; the direct path is a smaller graph, which traces in about half the time.
    """
    dtype = tf.as_dtype(spec.dtype)
    features = tf.constant(data.features)
    target = tf.constant(data.target)
    rows = data.rows
    batch = batch_size_for(spec.batch_size, rows)
    steps_per_epoch = math.ceil(rows / batch)
    variables = model.trainable_variables
    keep_history = plan.is_linear
    history_width = sum(int(np.prod(variable.shape)) for variable in variables)

    def gradients_of(batch_features, batch_target, global_batch_size):
        # Each replica scales its summed loss by the global batch size, so the gradients
        # summed over the replicas are exactly the single-device gradient of the global batch.
        with tf.GradientTape() as tape:
            outputs = tf.reshape(model(batch_features, training=True), [-1, 1])
            squared_error = tf.reduce_sum(tf.square(outputs - batch_target))
            loss = squared_error / global_batch_size
        return squared_error, tape.gradient(loss, variables)

    def replica_step(indices):
        # Each replica takes every k-th row of the global batch.
        replica = tf.distribute.get_replica_context()
        mine = indices[replica.replica_id_in_sync_group :: replica.num_replicas_in_sync]
        global_batch_size = tf.cast(tf.size(indices), dtype)
        return flattened(*gradients_of(tf.gather(features, mine), tf.gather(target, mine), global_batch_size))

    def full_batch_step(shard_features, shard_target):
        return flattened(*gradients_of(shard_features, shard_target, tf.constant(float(rows), dtype)))

    # With the full batch every step sees the same rows: cut each replica's shard once
    # rather than gathering the data again every step.
    shards = strategy.experimental_distribute_values_from_function(
        lambda replica: (
            features[replica.replica_id_in_sync_group :: replica.num_replicas_in_sync],
            target[replica.replica_id_in_sync_group :: replica.num_replicas_in_sync],
        )
    )

    sizes = [int(np.prod(variable.shape)) for variable in variables]

    def flattened(squared_error, gradients):
        # One vector per replica: the strategy then sums all of it in one collective (a
        # nested structure would be one collective per tensor, and MultiWorkerMirrored
        # cannot pack tensors of different ranks).
        return tf.concat([tf.reshape(squared_error, [1])] + [tf.reshape(g, [-1]) for g in gradients], 0)

    def update(per_replica):
        # Sum the replicas' errors and gradients (a no-op on one device), then apply the
        # update once, in cross-replica context, to every copy of the variables.
        summed = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        parts = tf.split(summed, [1, *sizes])
        gradients = [tf.reshape(part, variable.shape) for part, variable in zip(parts[1:], variables)]
        rule.apply(variables, gradients)
        return parts[0][0]

    def one_device_step(batch_features, batch_target, global_batch_size):
        squared_error, gradients = gradients_of(batch_features, batch_target, global_batch_size)
        rule.apply(variables, gradients)
        return squared_error

    def full_batch():
        if one_device:
            return one_device_step(features, target, tf.constant(float(rows), dtype))
        return update(strategy.run(full_batch_step, args=shards))

    def minibatch(indices):
        if one_device:
            global_batch_size = tf.cast(tf.size(indices), dtype)
            return one_device_step(
                tf.gather(features, indices), tf.gather(target, indices), global_batch_size
            )
        return update(strategy.run(replica_step, args=(indices,)))

    @tf.function
    def run(epochs, seed, first_epoch):
        losses = tf.TensorArray(dtype, size=epochs)
        parameters = tf.TensorArray(
            dtype, size=epochs if keep_history else 0, element_shape=[history_width if keep_history else 0]
        )
        stamps = tf.TensorArray(tf.float64, size=epochs + 1)
        stamps = stamps.write(0, tf.timestamp())
        all_rows = tf.range(rows)
        for epoch in tf.range(epochs):
            if steps_per_epoch == 1:
                total = full_batch()
            else:
                # Keras fit's meaning of an epoch: every row once, in a fresh order. A
                # stateless shuffle gives every worker (and the single-device twin) the
                # same order for the same seed and epoch, counted from the job's first
                # epoch, so a run in chunks shuffles as the whole run does.
                epoch_seed = tf.stack([seed, tf.cast(first_epoch + epoch, tf.int64)])
                order = tf.random.experimental.stateless_shuffle(all_rows, seed=epoch_seed)
                total = tf.constant(0.0, dtype)
                for start in tf.range(0, rows, batch):
                    indices = order[start : tf.minimum(start + batch, rows)]
                    total += minibatch(indices)
            losses = losses.write(epoch, total / rows)
            if keep_history:
                flat = [tf.reshape(tf.convert_to_tensor(variable), [-1]) for variable in variables]
                parameters = parameters.write(epoch, tf.concat(flat, 0))
            stamps = stamps.write(epoch + 1, tf.timestamp())
        return losses.stack(), parameters.stack(), stamps.stack()

    return run.get_concrete_function(
        tf.constant(spec.epochs), tf.constant(spec.seed, tf.int64), tf.constant(0)
    )


# What a pack's jobs must share beyond model and data (jobs/plan/packing.py groups them so).
PACK_SHARED = ("variant", "dtype", "optimizer", "batch_size", "epochs", "loop", "shared_start")


def _shared_fields(spec: JobSettings) -> tuple:
    """PACK_SHARED's values, and whether Keras's own initialiser starts the job."""
    return (*(getattr(spec, name) for name in PACK_SHARED), spec.initial_value is None)


def _member_starts(specs: Sequence[JobSettings], plan: ModelPlan) -> list[np.ndarray]:
    """Each parameter's initial values for every pack job, stacked [jobs, ...] in the canonical layout.

    Each job starts as train_variant starts it alone.
    """
    shapes = [shape for _, shape in plan.layout]
    first = specs[0]
    if first.shared_start:
        return _stacked([draw(shapes, spec.seed, spec.dtype) for spec in specs])
    if first.initial_value is not None:
        return _stacked(
            [[np.full(shape, spec.initial_value, dtype=spec.dtype) for shape in shapes] for spec in specs]
        )
    drawn = _keras_draws(specs, plan)
    check = (first.dtype, tuple(shapes))
    if check not in _KERAS_DRAW_MATCHES:
        built = _keras_start(first, plan)
        _KERAS_DRAW_MATCHES[check] = all(
            values[0].dtype == one.dtype
            and values[0].shape == one.shape
            and values[0].tobytes() == one.tobytes()
            for values, one in zip(drawn, built, strict=True)
        )
    if _KERAS_DRAW_MATCHES[check]:
        return drawn
    # This Keras's Dense layers draw otherwise: each job's model, built as it is alone.
    return _stacked([_keras_start(spec, plan) for spec in specs])


# Whether _keras_draws gave a pack's first job exactly its built model's parameters, by dtype and
# layout. Checked once a process: building the model costs about 20 ms, and its
# keras.utils.set_random_seed clears TensorFlow's kernel caches, so the eager operations after
# it and the packed loop's next call instantiate their kernels again (tens of ms). The draw's
# arithmetic is the same for every seed, and Keras cannot change within a process.
_KERAS_DRAW_MATCHES: dict[tuple, bool] = {}


def _stacked(starts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Jobs' parameter lists as one [jobs, ...] array a parameter."""
    return [np.stack(values) for values in zip(*starts)]


def _keras_start(spec: JobSettings, plan: ModelPlan) -> list[np.ndarray]:
    """Keras's own initial parameters for a job: its model's, built after its seed (about 20 ms)."""
    keras.utils.set_random_seed(spec.seed)
    return [variable.numpy() for variable in build_model(spec, plan).trainable_variables]


def _keras_draws(specs: Sequence[JobSettings], plan: ModelPlan) -> list[np.ndarray]:
    """What _keras_start gives each job, for all of them at once in numpy: [jobs, ...] a parameter.

    Keras 3's Dense layer (glorot_uniform kernel, zero bias) makes its GlorotUniform
    initialiser when the layer is made, and the initialiser, given no seed, takes one from
    Python's generator: random.randint(1, 10**9), which keras.utils.set_random_seed seeds
    with random.seed. Building the kernel then calls keras.random.uniform with that integer
    seed, which the TensorFlow backend turns into tf.random.stateless_uniform with seed
    [seed mod (2**31 - 2), 0] and bounds of +-sqrt(6 / (inputs + outputs)). So each layer's
    kernel seed is the layer's draw from random.Random(job seed) (the generator random.seed
    starts), and the uniform values are TensorFlow's stateless Philox stream for that seed
    (_stateless_uniform), scaled as the op scales them. Seeding Keras and drawing eagerly
    would cost about 6 ms a job, nearly all in re-creating the kernels whose cache
    tf.random.set_seed clears; this costs microseconds. _member_starts checks the result
    against a built model.
    """
    dtype = np.dtype(specs[0].dtype)
    generators = [random.Random(spec.seed) for spec in specs]
    kernel_seeds = np.array(
        [[generator.randint(1, int(1e9)) for _ in plan.layers] for generator in generators], dtype=np.int64
    ).reshape(len(specs), len(plan.layers)) % (2**31 - 2)
    starts = []
    for index, layer in enumerate(plan.layers):
        # VarianceScaling(scale=1, mode="fan_avg", distribution="uniform"), Keras's arithmetic.
        limit = math.sqrt(3.0 * (1.0 / max(1.0, (layer.inputs + layer.outputs) / 2.0)))
        # Keras passes the bounds through tf.cast, which makes a Python float a float32 tensor
        # before casting it to the dtype: a float64 kernel's bounds are float32's rounding.
        minimum, maximum = (np.float32(bound).astype(dtype) for bound in (-limit, limit))
        unit = _stateless_uniform(kernel_seeds[:, index], layer.inputs * layer.outputs, dtype)
        # The op's own scaling: unit * (maxval - minval) + minval, each rounded in the dtype.
        kernels = unit * (maximum - minimum) + minimum
        starts.append(kernels.reshape(len(specs), layer.inputs, layer.outputs))
        starts.append(np.zeros((len(specs), layer.outputs), dtype=dtype))
    return starts


# Philox4x32-10 as TensorFlow's CPU kernels compute it (tensorflow/core/lib/random/philox_random.h):
# the round multipliers and the key's step between rounds.
_PHILOX_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY_STEPS = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
# The key a stateless op's seed is scrambled with (stateless_random_ops.cc, GenerateKey).
_SEED_SCRAMBLING_KEY = (np.uint64(0x3EC8F720), np.uint64(0x02461E29))
_LOW_32_BITS = np.uint64(0xFFFFFFFF)
_WORD_BITS = np.uint64(32)


def _philox(counter, key):
    """Philox4x32-10 of a 4-word counter under a 2-word key, each word a uint64 array of 32-bit values.

    A round multiplies two counter words by constants into 64-bit products (exact in uint64:
    both factors are below 2**32), mixes their halves with the other words and the key, then
    steps the key; TensorFlow's uint32 wrap-around is the mask.
    """
    word_0, word_1, word_2, word_3 = counter
    key_0, key_1 = key
    for round_number in range(10):
        if round_number:
            key_0 = (key_0 + _PHILOX_KEY_STEPS[0]) & _LOW_32_BITS
            key_1 = (key_1 + _PHILOX_KEY_STEPS[1]) & _LOW_32_BITS
        product_0 = word_0 * _PHILOX_MULTIPLIERS[0]
        product_1 = word_2 * _PHILOX_MULTIPLIERS[1]
        word_0, word_1, word_2, word_3 = (
            (product_1 >> _WORD_BITS) ^ word_1 ^ key_0,
            product_1 & _LOW_32_BITS,
            (product_0 >> _WORD_BITS) ^ word_3 ^ key_1,
            product_0 & _LOW_32_BITS,
        )
    return word_0, word_1, word_2, word_3


def _stateless_uniform(seeds: np.ndarray, count: int, dtype: np.dtype) -> np.ndarray:
    """tf.random.stateless_uniform([count], seed=[seed, 0], dtype=dtype) for each seed: [seeds, count].

    `seeds` are non-negative int32 values. On CPU the op (algorithm auto_select, which is
    Philox there) scrambles its seed into a key and counter with one Philox call under a
    fixed key, then fills its output block by block: block b is Philox of the counter plus
    b, whose four 32-bit words give four float32 values in [0, 1) (23 bits of mantissa each)
    or two float64 ones (52 bits from two words). Every seed's blocks are one array here.
    """
    seeds = seeds.astype(np.uint64)[:, np.newaxis]
    zeros = np.zeros_like(seeds)
    # The seed [seed, 0] is the counter's words seed, 0, 0, 0.
    mixed = _philox(
        (seeds, zeros, zeros, zeros), (zeros + _SEED_SCRAMBLING_KEY[0], zeros + _SEED_SCRAMBLING_KEY[1])
    )
    # The scrambled counter's first two words are 0, so counter + b has words b, 0, mixed[2], mixed[3]
    # (the arrays broadcast: [seeds, 1] words and [1, blocks] block numbers make [seeds, blocks]).
    per_block = 4 if dtype == np.float32 else 2
    blocks = np.arange(-(-count // per_block), dtype=np.uint64)[np.newaxis, :]
    words = np.stack(np.broadcast_arrays(*_philox((blocks, zeros, mixed[2], mixed[3]), mixed[:2])), axis=-1)
    if dtype == np.float32:
        # Uint32ToFloat: exponent 127 over the word's low 23 bits is 1 + fraction; minus 1.
        bits = ((words & np.uint64(0x7FFFFF)) | np.uint64(0x3F800000)).astype(np.uint32)
        values = bits.view(np.float32) - np.float32(1.0)
    else:
        # Uint64ToDouble: 20 bits of one word and 32 of the next under exponent 1023; minus 1.
        high, low = words[..., 0::2], words[..., 1::2]
        bits = ((high & np.uint64(0xFFFFF)) << _WORD_BITS) | low | np.uint64(1023 << 52)
        values = bits.view(np.float64) - 1.0
    return values.reshape(len(seeds), -1)[:, :count]


def _rule_settings(specs: Sequence[JobSettings], dtype) -> _PackSettings:
    betas = sorted({beta for spec in specs for beta in (spec.beta_1, spec.beta_2)})
    position = {beta: index for index, beta in enumerate(betas)}
    return _PackSettings(
        learning_rate=tf.constant([spec.lr for spec in specs], dtype),
        beta_1=tf.constant([spec.beta_1 for spec in specs], dtype),
        beta_2=tf.constant([spec.beta_2 for spec in specs], dtype),
        epsilon=tf.constant([spec.epsilon for spec in specs], dtype),
        betas=tf.constant(betas, dtype),
        beta_1_index=tf.constant([position[spec.beta_1] for spec in specs], tf.int32),
        beta_2_index=tf.constant([position[spec.beta_2] for spec in specs], tf.int32),
    )


# Each activation as Keras computes it (its gelu is tf.nn.gelu's exact one), so that a packed
# job's outputs round as its Keras model's do; _ACTIVATION_OPERATIONS' gelu is ONNX's form.
_PACKED_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "linear": lambda values: values,
    "relu": tf.nn.relu,
    "tanh": tf.math.tanh,
    "gelu": lambda values: tf.nn.gelu(values, approximate=False),
}


def _packed_forward(plan: ModelPlan, parameters, inputs):
    """Every job's dense stack on `inputs` ([rows, K] for all jobs, or [jobs, rows, K]): [jobs, rows, 1].

    Each layer is Keras Dense's x @ kernel + bias, then its activation, with one job a batch
    entry of tf.matmul.
    """
    outputs = inputs if inputs.shape.rank == 3 else inputs[tf.newaxis]
    for index, layer in enumerate(plan.layers):
        kernel, bias = parameters[2 * index], parameters[2 * index + 1]
        outputs = _PACKED_ACTIVATIONS[layer.activation](tf.matmul(outputs, kernel) + bias[:, tf.newaxis, :])
    return outputs


def _packed_update(optimizer: str, state, gradients, settings: _PackSettings):
    """OwnUpdateRule.apply for every job at once, each with its own settings; returns the new state."""
    parameters, first, second, step_number = state

    def per_job(values, parameter):  # [jobs] -> [jobs, 1, ...], to scale a parameter job by job
        return tf.reshape(values, [-1] + [1] * (parameter.shape.rank - 1))

    if optimizer == "sgd":
        updated = [
            parameter - per_job(settings.learning_rate, parameter) * gradient
            for parameter, gradient in zip(parameters, gradients)
        ]
        return updated, first, second, step_number
    step_number = step_number + 1.0
    one = tf.constant(1.0, step_number.dtype)
    # One scalar tf.pow a distinct beta, as a job alone computes it: on a vector, TensorFlow's
    # pow is Eigen's vectorised one, an ulp off, which is up to 1.5e-5 of 1 - 0.999**t in float32.
    powers = tf.map_fn(lambda beta: tf.pow(beta, step_number), settings.betas)
    correction_1 = one - tf.gather(powers, settings.beta_1_index)
    correction_2 = one - tf.gather(powers, settings.beta_2_index)
    new_parameters, new_first, new_second = [], [], []
    for parameter, gradient, moment_1, moment_2 in zip(parameters, gradients, first, second):
        beta_1, beta_2 = per_job(settings.beta_1, parameter), per_job(settings.beta_2, parameter)
        moment_1 = beta_1 * moment_1 + (one - beta_1) * gradient
        # In a job's own loop (1 - beta_2) is a scalar, and Grappler's arithmetic optimiser
        # reorders its (1 - beta_2) * g * g to multiply g * g first; written so here, the pack's
        # [jobs, 1, ...] factor rounds alike (bit for bit, on the article's data).
        moment_2 = beta_2 * moment_2 + gradient * gradient * (one - beta_2)
        update = (
            per_job(settings.learning_rate, parameter)
            * (moment_1 / per_job(correction_1, parameter))
            / (tf.sqrt(moment_2 / per_job(correction_2, parameter)) + per_job(settings.epsilon, parameter))
        )
        new_parameters.append(parameter - update)
        new_first.append(moment_1)
        new_second.append(moment_2)
    return new_parameters, new_first, new_second, step_number


def _trace_pack(spec: JobSettings, plan: ModelPlan, data: TrainingData, pack_size: int):
    """A pack's whole run as one compiled function; tracing it is set-up.

    It takes the jobs' stacked initial parameters ([jobs, inputs, outputs] kernels, [jobs,
    outputs] biases), seeds, settings and the epochs, and returns the losses [epochs, jobs],
    the learned parameters, the linear model's history [epochs, jobs, K + 1] and the
    epochs' time stamps. Each step is _trace's: the loss whose gradient is taken is the sum
    of the jobs' losses, so each job's gradient is its own loss's alone; the update is
    OwnUpdateRule's with each job's settings. Nothing is reduced across jobs.
    """
    dtype = tf.as_dtype(spec.dtype)
    features = tf.constant(data.features)
    target = tf.constant(data.target)
    rows = data.rows
    batch = batch_size_for(spec.batch_size, rows)
    steps_per_epoch = math.ceil(rows / batch)
    keep_history = plan.is_linear
    history_width = plan.feature_count + 1 if keep_history else 0

    def step(state, settings, batch_features, batch_target, batch_rows):
        with tf.GradientTape() as tape:
            tape.watch(state[0])
            outputs = _packed_forward(plan, state[0], batch_features)
            squared_errors = tf.reduce_sum(tf.square(outputs - batch_target), axis=[1, 2])
            loss = tf.reduce_sum(squared_errors / batch_rows)
        gradients = tape.gradient(loss, state[0])
        return _packed_update(spec.optimizer, state, gradients, settings), squared_errors

    vector = tf.TensorSpec([pack_size], dtype)
    signature = (
        [tf.TensorSpec((pack_size, *shape), dtype) for _, shape in plan.layout],
        tf.TensorSpec([pack_size], tf.int64),
        _PackSettings(
            vector,
            vector,
            vector,
            vector,
            tf.TensorSpec([None], dtype),
            *[tf.TensorSpec([pack_size], tf.int32)] * 2,
        ),
        tf.TensorSpec([], tf.int32),
    )

    @tf.function(input_signature=signature)
    def run(parameters, seeds, settings, epochs):
        zeros = [tf.zeros_like(parameter) for parameter in parameters]
        state = (parameters, zeros, zeros, tf.constant(0.0, dtype))
        losses = tf.TensorArray(dtype, size=epochs, element_shape=[pack_size])
        history = tf.TensorArray(
            dtype, size=epochs if keep_history else 0, element_shape=[pack_size, history_width]
        )
        stamps = tf.TensorArray(tf.float64, size=epochs + 1)
        stamps = stamps.write(0, tf.timestamp())
        all_rows = tf.range(rows)
        for epoch in tf.range(epochs):
            if steps_per_epoch == 1:
                state, total = step(state, settings, features, target, tf.constant(float(rows), dtype))
            else:
                # Each job's own order, the one it shuffles alone (_trace): seeded [seed, epoch].
                epoch_seeds = tf.stack([seeds, tf.fill([pack_size], tf.cast(epoch, tf.int64))], axis=1)
                orders = tf.map_fn(
                    lambda epoch_seed: tf.random.experimental.stateless_shuffle(all_rows, seed=epoch_seed),
                    epoch_seeds,
                    fn_output_signature=tf.int32,
                )
                total = tf.zeros([pack_size], dtype)
                for start in tf.range(0, rows, batch):
                    indices = orders[:, start : tf.minimum(start + batch, rows)]
                    batch_rows = tf.cast(tf.shape(indices)[1], dtype)
                    state, squared_errors = step(
                        state, settings, tf.gather(features, indices), tf.gather(target, indices), batch_rows
                    )
                    total += squared_errors
            losses = losses.write(epoch, total / rows)
            if keep_history:
                flat = [tf.reshape(parameter, [pack_size, -1]) for parameter in state[0]]
                history = history.write(epoch, tf.concat(flat, 1))
            stamps = stamps.write(epoch + 1, tf.timestamp())
        return losses.stack(), state[0], history.stack(), stamps.stack()

    return run.get_concrete_function()


def _fit_loop(spec, plan, data, model, schedule: ReportSchedule, setup_started) -> TrainerOutcome:
    model.compile(optimizer=_stock_optimizer(spec), loss="mse")
    epoch_seconds: list[float] = []
    parameters: list[np.ndarray] = []
    # One fit for every chunk: a fit per chunk would draw fit's shuffles from another
    # point of the seeded generator. The callback reports where each chunk ends instead.
    chunk_ends = {last for _, last in schedule.chunks()}

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)
            if plan.is_linear:
                kernel, bias = model.layers[0].get_weights()
                parameters.append(np.concatenate([kernel.reshape(-1), bias]))
            if epoch + 1 in chunk_ends and schedule.stop_after(epoch + 1, logs["loss"]):
                # fit ends after this epoch; its history holds the epochs trained.
                model.stop_training = True

    setup_s = time.perf_counter() - setup_started
    train_started = time.perf_counter()
    history = model.fit(
        data.features,
        data.target,
        epochs=spec.epochs,
        batch_size=spec.batch_size or data.rows,
        verbose=0,
        callbacks=[EpochRecorder()],
    )
    train_s = time.perf_counter() - train_started
    predictions, predict_s = _predict(model, data.prediction_inputs, use_keras_predict=True)
    return _outcome(
        plan,
        data,
        model,
        [float(value) for value in history.history["loss"]],
        np.asarray(parameters) if plan.is_linear else None,
        epoch_seconds,
        predictions,
        setup_s,
        train_s,
        predict_s,
        stock_rule("tensorflow", spec.optimizer),
    )


def _predict(model, inputs: np.ndarray, use_keras_predict: bool) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    if len(inputs) == 0:
        outputs = np.zeros((0, 1))
    elif use_keras_predict:
        outputs = model.predict(inputs, verbose=0)
    else:
        outputs = np.asarray(model(tf.constant(inputs), training=False))
    return outputs.reshape(-1), time.perf_counter() - started


def _outcome(
    plan,
    data,
    model,
    losses,
    parameters,
    epoch_seconds,
    predictions,
    setup_s,
    train_s,
    predict_s,
    update_rule,
) -> TrainerOutcome:
    fitted = None
    if not plan.is_linear:
        fitted = np.asarray(model(tf.constant(data.features), training=False), dtype=np.float64).reshape(-1)
    return TrainerOutcome(
        parameters=[np.asarray(variable.numpy(), dtype=np.float64) for variable in model.trainable_variables],
        loss_history=[float(value) for value in losses],
        epoch_seconds=[float(value) for value in epoch_seconds],
        parameter_history=(
            None if parameters is None else np.asarray(parameters, dtype=np.float64).reshape(len(losses), -1)
        ),
        predictions=predictions,
        setup_s=setup_s,
        train_s=train_s,
        predict_s=predict_s,
        fitted=fitted,
        parameter_names=[variable.path for variable in model.trainable_variables],
        update_rule=update_rule,
    )


def _placement(device: Device) -> str:
    return "/CPU:0" if device.name == "cpu" else device.name


def _user_model_for_export(plan: ModelPlan):
    """The user's Keras model as build_tensorflow makes it (float32, seed 0), its variables created."""
    model = build_model(EXPORT_SETTINGS, plan)
    if not model.built or not model.trainable_variables:
        # A subclassed model makes its variables on its first call.
        model(np.zeros((1, plan.feature_count), dtype=np.float32))
    return model


def _assign_parameters(model, plan: ModelPlan, parameters: list[np.ndarray]) -> None:
    """Give the Keras model the learned `parameters`, in the order of its trainable variables."""
    layout = layout_of(model)
    shapes = [tuple(np.shape(values)) for values in parameters]
    if [shape for _, shape in layout] != shapes:
        raise ValueError(
            f"{plan.name}: the rebuilt Keras model's parameters ({describe_layout(layout)}) do not match "
            f"the {len(shapes)} learned ones ({', '.join(str(list(shape)) for shape in shapes)})"
        )
    for variable, values in zip(model.trainable_variables, parameters):
        variable.assign(np.asarray(values, dtype=np.float32))


def _exact_gelu(values):
    """x * Phi(x) written with erf, which ONNX has (Keras's gelu uses erfc, which it has not)."""
    return 0.5 * values * (1.0 + tf.math.erf(values / math.sqrt(2.0)))


# Each activation runjobs builds, as the TensorFlow operations predict and ONNX compute it with.
_ACTIVATION_OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "linear": lambda values: values,
    "relu": tf.nn.relu,
    "tanh": tf.math.tanh,
    "gelu": _exact_gelu,
}


def _onnx_forward(model, plan: ModelPlan) -> Callable[[Any], Any]:
    """What tf2onnx converts: a dense stack written out with _ACTIVATION_OPERATIONS, else the model."""
    if plan.user is not None:
        return lambda features: model(features)
    import keras as keras_package

    dense_layers = [layer for layer in model.layers if isinstance(layer, keras_package.layers.Dense)]

    def forward(features):
        outputs = features
        for layer, described in zip(dense_layers, plan.layers):
            outputs = _ACTIVATION_OPERATIONS[described.activation](
                tf.matmul(outputs, layer.kernel) + layer.bias
            )
        return outputs

    return forward


def _dense_stack_predictor(layers, parameters: list[np.ndarray]) -> Predictor:
    """A dense stack computed from its parameters with eager operations: no graph of a file is run."""
    constants = [tf.constant(np.asarray(values, dtype=np.float32)) for values in parameters]

    def predict(features: np.ndarray):
        outputs = tf.constant(np.asarray(features, dtype=np.float32))
        for index, layer in enumerate(layers):
            kernel, bias = constants[2 * index], constants[2 * index + 1]
            outputs = _ACTIVATION_OPERATIONS[layer.activation](tf.matmul(outputs, kernel) + bias)
        return outputs.numpy()

    return Predictor(layers[0].inputs, predict)


def _load_saved_model(path: Path) -> Predictor:
    """A SavedModel's dense stack, computed from its variables: its graph is never run.

    A SavedModel's signature is a graph whose ops can write files or reach the network
    (tf.io.write_file, for one), so loading it with tf.saved_model.load and calling it
    would run whatever its author put there. The checkpoint's variables are read as
    tensors (no op executed) and matched to the layers model.json beside the directory
    lists: kernel [inputs, outputs] then bias [outputs], layer by layer, in Keras's
    order. Without model.json, the variables must be exactly a linear model's kernel
    [K, 1] and bias [1]. A user model's SavedModel is refused: only its graph knows
    how its variables combine.
    """
    from workers.export import (
        MANIFEST,
        manifest_beside,
        manifest_layers,
        manifest_user_model,
        readable_instead,
        user_model_file,
    )
    from workers.models import DenseLayer

    manifest = manifest_beside(path)
    user_model = manifest_user_model(manifest)
    if user_model is not None:
        raise ModelLoadError(
            f"{path}: the SavedModel of user model {user_model_file(user_model)}, which only its graph "
            "computes, and runjobs predict never runs a SavedModel's graph; predict from "
            f"{readable_instead(path, manifest, 'saved_model')} instead"
        )
    layers = manifest_layers(manifest, path.parent / MANIFEST)
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    if layers is None:
        kernel, bias = _linear_variables(path, reader)
        layers = (DenseLayer(int(kernel.shape[0]), 1),)
        return _dense_stack_predictor(layers, [kernel, bias])
    return _dense_stack_predictor(layers, _stack_variables(path, reader, layers))


_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _keras_variable_index(name: str, collection: str) -> int | None:
    """N of `COLLECTION/N/.ATTRIBUTES/VARIABLE_VALUE`, how a Keras SavedModel names its variables."""
    prefix, suffix = f"{collection}/", "/.ATTRIBUTES/VARIABLE_VALUE"
    middle = name[len(prefix) : -len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
    return int(middle) if middle.isdigit() else None


def _stack_variables(path: Path, reader, layers) -> list[np.ndarray]:
    """The checkpoint's variables as the stack's kernel and bias of each layer, or a refusal naming them."""
    from workers.export import MANIFEST

    # Keras lists each variable as `variables/N` (N in the model's order) and again under
    # `_all_variables`, in another order.
    shapes = reader.get_variable_to_shape_map()
    ordered: dict[int, str] = {}
    copies: list[str] = []
    others: list[str] = []
    for name, shape in shapes.items():
        if name == _OBJECT_GRAPH:
            continue
        index = _keras_variable_index(name, "variables")
        if index is not None:
            ordered[index] = name
        elif _keras_variable_index(name, "_all_variables") is not None:
            copies.append(name)
        else:
            others.append(f"{name} {list(shape)}")
    expected = [shape for layer in layers for shape in ([layer.inputs, layer.outputs], [layer.outputs])]
    found = [list(shapes[ordered[index]]) for index in sorted(ordered)]
    values = [reader.get_tensor(ordered[index]) for index in sorted(ordered)]
    # Every copy must be one of the stack's variables: nothing else hides in the checkpoint.
    hidden = [
        name for name in copies if not any(np.array_equal(reader.get_tensor(name), value) for value in values)
    ]
    if others or hidden or sorted(ordered) != list(range(len(ordered))) or found != expected:
        described = ", ".join(str(shape) for shape in found) or "none"
        extra = f"; also {', '.join(others + hidden)}" if others or hidden else ""
        raise ModelLoadError(
            f"{path}: its variables ({described}{extra}) are not the layers {MANIFEST} beside it lists "
            f"({', '.join(str(shape) for shape in expected)}: kernel then bias, layer by layer); runjobs "
            "predict reads only the variables of the SavedModel written with that model.json and never "
            "runs a SavedModel's graph"
        )
    return values


def _linear_variables(path: Path, reader) -> tuple[np.ndarray, np.ndarray]:
    """A SavedModel without model.json: its variables must be exactly a kernel [K, 1] and a bias [1]."""
    kernels, biases, others = [], [], []
    for name, shape in reader.get_variable_to_shape_map().items():
        if name == _OBJECT_GRAPH:
            continue
        if len(shape) == 2 and shape[1] == 1:
            kernels.append(reader.get_tensor(name))
        elif list(shape) == [1]:
            biases.append(reader.get_tensor(name))
        else:
            others.append(f"{name} {list(shape)}")
    # Keras lists each variable twice (as `variables` and `_all_variables`): the same values.
    same = all(np.array_equal(kernels[0], kernel) for kernel in kernels) if kernels else False
    same = same and biases and all(np.array_equal(biases[0], bias) for bias in biases)
    if others or not same:
        raise ModelLoadError(
            f"{path}: not a linear model runjobs wrote (variables: "
            f"{', '.join(others) or f'{len(kernels)} kernel(s), {len(biases)} bias(es)'}), and no "
            "model.json beside it lists a stack's layers; runjobs predict reads only the variables "
            "of a SavedModel runjobs wrote and never runs a SavedModel's graph"
        )
    return np.asarray(kernels[0], dtype=np.float32), np.asarray(biases[0], dtype=np.float32)


KERAS_LAYERS = ("InputLayer", "Dense")
# The activations a Dense layer of a .keras file may have: those runjobs builds.
KERAS_ACTIVATIONS = ("linear", "relu", "tanh", "gelu")
# Dense options that would deserialise further objects; runjobs writes none of them.
_KERAS_DENSE_NONE = (
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "quantization_config",
)


def _load_keras(path: Path) -> Predictor:
    """A .keras file of a dense stack: its config checked to be one runjobs builds before Keras reads it.

    Accepted: a Sequential of an InputLayer and Dense layers whose activations are
    linear, relu, tanh or gelu, the last giving one value, every object in the config
    a built-in Keras one (no registered or custom object). safe_mode already refuses
    configs that deserialise Python code (a Lambda layer); the check also refuses any
    other layer, activation or custom object, so only what runjobs writes is ever built.
    """
    import json
    import zipfile

    import keras as keras_package

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, RecursionError, zipfile.BadZipFile) as error:
        raise ModelLoadError(
            f"{path}: cannot load it as a keras model (not a .keras archive: {error})"
        ) from None
    refusal = _keras_refusal(config)
    if refusal is not None:
        from workers.export import manifest_beside, manifest_user_model, readable_instead, user_model_file

        manifest = manifest_beside(path)
        user_model = manifest_user_model(manifest)
        instead = (
            f"; this is user model {user_model_file(user_model)}: predict from "
            f"{readable_instead(path, manifest, 'keras')} instead"
            if user_model is not None
            else "; give the model directory runjobs submit --save-models wrote"
        )
        raise ModelLoadError(
            f"{path}: not a dense stack runjobs reads ({refusal}); runjobs predict reads a .keras file "
            f"holding a Sequential of an input and Dense layers ({', '.join(KERAS_ACTIVATIONS)}) and no "
            f"custom objects{instead}"
        )
    # safe_mode refuses a .keras file whose config would deserialise Python code (lambdas);
    # compile=False: nothing of the training configuration is deserialised.
    model = keras_package.saving.load_model(path, safe_mode=True, compile=False)
    feature_count = model.input_shape[-1] if isinstance(model.input_shape, tuple) else None

    def predict(features: np.ndarray):
        return keras_package.ops.convert_to_numpy(model(features))

    return Predictor(feature_count, predict)


def _keras_refusal(config) -> str | None:
    """Why a .keras config is not a dense stack runjobs reads (what it holds instead), or None."""
    if not isinstance(config, dict):
        return "its config is not an object"
    if config.get("class_name") != "Sequential":
        return f"a {config.get('class_name')} model, not a Sequential"
    layers = (config.get("config") or {}).get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        return "its layers are not a list"
    names = [layer.get("class_name") for layer in layers]
    others = list(dict.fromkeys(str(name) for name in names if name not in KERAS_LAYERS))
    if others:
        return f"layer {', '.join(others)}"
    if len(names) < 2 or names[0] != "InputLayer" or "InputLayer" in names[1:]:
        return "not an input followed by Dense layers"
    shape = (layers[0].get("config") or {}).get("batch_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int)):
        return f"input shape {shape}, not [rows, features]"
    try:
        custom = _custom_objects(config)
    except RecursionError:
        return "its config is nested too deeply"
    if custom:
        return f"custom object {custom[0]}"
    for layer in layers[1:]:
        options = layer.get("config") or {}
        activation = options.get("activation", "linear")
        if activation not in KERAS_ACTIVATIONS:
            return f"activation {activation!r}"
        set_options = [name for name in _KERAS_DENSE_NONE if options.get(name) is not None]
        if set_options:
            return f"Dense option {set_options[0]}"
    if (layers[-1].get("config") or {}).get("units") != 1:
        return f"the last Dense layer gives {(layers[-1].get('config') or {}).get('units')} values, not 1"
    return None


def _custom_objects(config, found: list[str] | None = None) -> list[str]:
    """Every object in the config that is not a built-in Keras one (a registered name or another module)."""
    found = [] if found is None else found
    if isinstance(config, dict):
        # A built-in's registered_name is None or its class name; a registered custom
        # object's is `package>Name`, and its module is the user's.
        if "class_name" in config and (
            config.get("registered_name") not in (None, config.get("class_name"))
            or str(config.get("module") or "keras").split(".")[0] != "keras"
        ):
            name = config.get("registered_name") or config.get("class_name")
            if config.get("class_name") == "function" and isinstance(config.get("config"), str):
                name = config["config"]  # a registered function: its `package>name`
            found.append(f"{name} (module {config.get('module')})")
        for value in config.values():
            _custom_objects(value, found)
    elif isinstance(config, list):
        for value in config:
            _custom_objects(value, found)
    return found
