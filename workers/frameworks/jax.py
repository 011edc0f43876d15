"""JAX: the job's model as a pure function of a list of arrays, trained in one compiled loop.

A dense stack needs no layer library: its parameters are the canonical layout itself
(workers/models/__init__.py: each layer's kernel [inputs, outputs], then its bias), and
the model is `x @ kernel + bias` and the activation, layer by layer. A user model's
`build_jax(features, config)` returns `(apply, parameters)`: `parameters` is any pytree
of arrays (a list is simplest) and `apply(parameters, features)` returns the outputs,
[rows, 1] or [rows]. runjobs flattens the pytree with jax.tree_util, in its fixed order,
and that order is the model's layout: a shared start draws its leaves' shapes in it, and
the record names them `param_0`, `param_1`, ... for a list or tuple, or by their paths
(`dense/kernel`) for a dict or another pytree.

The whole run is one jax.jit-compiled function: a fori_loop over the epochs and, when
the batch is smaller than the data, a lax.scan over each epoch's batches (the rows
shuffled every epoch by jax.random.permutation(fold_in(key(seed), epoch)), so a
minibatch job sees its rows in another order than TensorFlow's and torch's). It is
lowered and compiled in set-up, so `train_s` is the run alone. `fast` updates with
runjobs' own rule (workers/update_rules.py, the same arithmetic and order as the other
frameworks); JAX has no stock fit, so `article` runs the same loop with optax's
optimizers, JAX's idiomatic stock ones. A warm worker keeps the compiled function for the
next job of the same shape (see `_loop_key`). A job that reports its loss
(workers/reporting.py) calls the same compiled function once per chunk of epochs. A pack
of jobs (`train_pack`) runs that function under jax.vmap, its jobs stacked along a
leading axis; XLA may sum a stacked job's gradients in another order than a lone job's,
so the two agree to float rounding, not bit for bit.

Precision: float64 needs JAX's x64 mode, a process-wide switch, which this module turns on
at import. Every array runjobs hands JAX carries its dtype explicitly, so a float32 job
stays float32. Matrix products run at full precision (`jax_default_matmul_precision`
"highest"): on recent NVIDIA GPUs JAX's default would multiply float32 in TF32, which
torch does not.

Exports `model.jax_export` (jax.export's serialised StableHLO with a symbolic batch
dimension: a compiled program, no Python) and `params.npz` (the parameter arrays and the
layers' activations, read back with allow_pickle=False). Importing this module imports
JAX; the registry imports it only for a job, export or prediction that needs JAX.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# JAX's equivalent of TensorFlow's memory growth: without it the first GPU job of a process
# reserves most of the GPU's memory, and another job cannot share the GPU. Read when JAX
# starts its GPU backend, so it must be set before then.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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
from workers.models import ModelPlan  # noqa: E402
from workers.models import user as user_models  # noqa: E402
from workers.models.shared_start import describe_layout, draw  # noqa: E402
from workers.reporting import ReportSchedule, TrainingMonitor  # noqa: E402
from workers.training import Device, TrainerOutcome, TrainingData, batch_size_for  # noqa: E402
from workers.update_rules import OWN_RULE, stock_rule  # noqa: E402

# float64 jobs need x64 arrays. The switch is process-wide and JAX reads it when it traces,
# so it is set once, here; float32 jobs pass float32 arrays and stay float32.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda outputs: outputs,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    # JAX's gelu defaults to the tanh approximation; torch's and Keras's are the exact (erf) one.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
# params.npz keeps the layers' activations in this array; `runjobs predict` also tells the
# file from another .npz by it (the format's archive_marker in the registry).
ACTIVATIONS_ENTRY = "jax_activations"
# Compiled loops kept per process: a sweep that alternates between a few shapes reuses each.
KEPT_LOOPS = 8
EXPORT_PLATFORMS = ("cpu", "cuda")  # an exported model runs on either, whichever trained it
# One function, so a warm worker's later jobs find it compiled.
_warm_up = jax.jit(lambda value: value + 1)


class JaxFramework(Framework):
    """JAX behind the framework interface; one instance per process keeps the compiled loops."""

    trained_variants = ("single",)
    reports_progress = True
    packs = True

    def __init__(self, description: FrameworkDescription) -> None:
        super().__init__(description)
        # Compiling the loop is most of a small job's set-up (0.3-1 s here); jobs that differ
        # only in seed, learning rate, optimizer settings, initial parameters, epochs (within
        # the loop's capacity) or the data's values reuse it: those enter it as arguments.
        self._loops: collections.OrderedDict[tuple, _CompiledLoop] = collections.OrderedDict()
        self.compilations = 0  # loops compiled by this process: a warm job of a known shape adds none

    def initialise(
        self,
        gpu_ids: tuple[str, ...],
        allow_cpu_fallback: bool,
        spec: JobSettings,
        context: WorkerContext = SINGLE_WORKER,
    ) -> Device:
        """Keep JAX on the CPU unless Ray assigned a GPU (then CUDA_VISIBLE_DEVICES makes it gpu:0)."""
        if not gpu_ids and not _backends_started():
            # Ray gave this job no GPU: never start JAX's GPU backend in this process.
            jax.config.update("jax_platforms", "cpu")
        visible = len(_gpu_devices()) if gpu_ids else 0
        device = choose_device(
            "jax",
            gpu_ids,
            visible,
            "gpu:0",
            allow_cpu_fallback,
            f"jax {self.version}, backends {', '.join(sorted(_platforms())) or 'none'}; "
            "install jax[cuda12] for CUDA",
        )
        # Start the runtime, and XLA's compiler, now: start-up, not the job's set-up.
        target = _jax_device(device)
        _warm_up(jax.device_put(np.zeros(1, np.float32), target)).block_until_ready()
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
        if context.is_distributed:
            raise ValueError("JAX trains the single variant only (one device)")
        target_device = _jax_device(device)
        model = build_model(spec, plan)
        initial = initialise_parameters(spec, plan, model)
        rule = update_rule(spec)
        put = functools.partial(jax.device_put, device=target_device)
        parameters = [put(values) for values in initial]
        state = jax.tree_util.tree_map(put, rule.initial_state(spec, parameters))
        features, target = put(data.features), put(data.target)
        prediction_inputs = put(data.prediction_inputs)
        seed = put(np.asarray(spec.seed, np.int64))

        def epoch(number: int):
            return put(np.asarray(number, np.int32))

        arguments = (parameters, state, features, target, epoch(0), epoch(spec.epochs), seed)
        loop = self._kept_loop(
            _loop_key(spec, plan, data, device),
            spec.epochs,
            lambda: _compile(spec, plan, data, model, rule, arguments, prediction_inputs),
        )
        setup_s = time.perf_counter() - setup_started

        train_started = time.perf_counter()
        learned = parameters
        loss_parts, history_parts, epoch_seconds = [], [], []
        # One call for the whole run, or one per chunk of a job that reports: the chunk
        # takes up the parameters and the rule's state where the last one left them, and
        # its epochs keep their numbers (the shuffle's key), so the chunks compute what
        # the whole run computes.
        for first, last in schedule.chunks():
            chunk_started = time.perf_counter()
            learned, state, losses, history = loop.run(
                learned, state, features, target, epoch(first), epoch(last), seed
            )
            loss_parts.append(np.asarray(losses)[first:last])
            if plan.is_linear:
                history_parts.append(np.asarray(history)[first:last])
            # The compiled loop keeps no per-epoch clock (a host callback per epoch would
            # cost more than a small epoch), so each epoch of a chunk is credited an even
            # share of the chunk.
            epoch_seconds += [(time.perf_counter() - chunk_started) / (last - first)] * (last - first)
            if schedule.stop_after(last, loss_parts[-1][-1]):
                break
        losses = np.concatenate(loss_parts)
        history = np.concatenate(history_parts) if plan.is_linear else None
        train_s = time.perf_counter() - train_started

        predict_started = time.perf_counter()
        predictions = (
            np.asarray(loop.predict(learned, prediction_inputs)).reshape(-1)
            if len(data.prediction_inputs)
            else np.zeros(0)
        )
        fitted = None
        if not plan.is_linear:
            fitted = np.asarray(loop.fit(learned, features), dtype=np.float64).reshape(-1)
        predict_s = time.perf_counter() - predict_started

        return TrainerOutcome(
            parameters=[np.asarray(values, dtype=np.float64) for values in learned],
            loss_history=[float(value) for value in losses],
            epoch_seconds=epoch_seconds,
            parameter_history=None if history is None else history.astype(np.float64),
            predictions=predictions,
            setup_s=setup_s,
            train_s=train_s,
            predict_s=predict_s,
            fitted=fitted,
            parameter_names=[name for name, _ in model.layout],
            update_rule=rule.name,
            stopped_at_epoch=schedule.stopped_at_epoch,
        )

    def train_pack(
        self, specs: Sequence[JobSettings], plan: ModelPlan, data: TrainingData, device: Device
    ) -> list[TrainerOutcome]:
        """Train the jobs as one compiled loop: train_variant's run, vmapped over the jobs' stacked state."""
        setup_started = time.perf_counter()
        first = specs[0]
        if first.loop != "fast":
            # The contract packs runjobs' own rule only; optax's rules train job by job.
            raise PackingUnsupported(f"JAX packs loop=fast jobs only, not loop={first.loop}")
        unlike = [spec for spec in specs if _packed_settings(spec) != _packed_settings(first)]
        if unlike:
            raise ValueError(
                f"a pack's jobs must share {', '.join(PACKED_SETTINGS)}; {len(unlike)} of {len(specs)} "
                f"differ from the first ({_packed_settings(first)} vs {_packed_settings(unlike[0])})"
            )
        members = _member_models(specs, plan, data)
        model = members[0]
        rule = update_rule(first)
        starts = [initialise_parameters(spec, plan, member) for spec, member in zip(specs, members)]
        put = functools.partial(jax.device_put, device=_jax_device(device))

        def stacked(*values):
            return put(np.stack(values))

        parameters = [stacked(*leaves) for leaves in zip(*starts)]
        state = jax.tree_util.tree_map(
            stacked, *[rule.initial_state(spec, start) for spec, start in zip(specs, starts)]
        )
        features, target = put(data.features), put(data.target)
        prediction_inputs = put(data.prediction_inputs)
        seeds = put(np.asarray([spec.seed for spec in specs], np.int64))
        epochs = first.epochs
        first_epoch, end_epoch = put(np.asarray(0, np.int32)), put(np.asarray(epochs, np.int32))
        arguments = (parameters, state, features, target, first_epoch, end_epoch, seeds)
        # A user model's function is its builder's for these seeds (_member_models checks it is one).
        seeds_key = tuple(spec.seed for spec in specs) if plan.user is not None else None
        key = ("pack", len(specs), seeds_key, *_loop_key(first, plan, data, device))

        def compile_pack() -> _CompiledLoop:
            try:
                return _compile(first, plan, data, model, rule, arguments, prediction_inputs, packed=True)
            except Exception as error:
                if plan.user is None:
                    raise
                raise PackingUnsupported(
                    f"the user model's apply does not run under jax.vmap: {_first_line(error)}"
                ) from error

        loop = self._kept_loop(key, epochs, compile_pack)
        setup_s = time.perf_counter() - setup_started

        train_started = time.perf_counter()
        learned, _, losses, history = loop.run(*arguments)
        losses = np.asarray(losses)[:, :epochs]
        history = np.asarray(history)[:, :epochs] if plan.is_linear else None
        train_s = time.perf_counter() - train_started

        predict_started = time.perf_counter()
        predictions = (
            np.asarray(loop.predict(learned, prediction_inputs))
            if len(data.prediction_inputs)
            else np.zeros((len(specs), 0))
        )
        fitted = None if plan.is_linear else np.asarray(loop.fit(learned, features), dtype=np.float64)
        predict_s = time.perf_counter() - predict_started

        learned = [np.asarray(values, dtype=np.float64) for values in learned]
        # As a reporting job's chunk: one call, its time shared evenly by its epochs.
        epoch_seconds = [train_s / epochs] * epochs
        return [
            TrainerOutcome(
                parameters=[values[index] for values in learned],
                loss_history=losses[index].tolist(),
                epoch_seconds=list(epoch_seconds),
                parameter_history=None if history is None else history[index].astype(np.float64),
                predictions=predictions[index],
                setup_s=setup_s,
                train_s=train_s,
                predict_s=predict_s,
                fitted=None if fitted is None else fitted[index],
                parameter_names=[name for name, _ in model.layout],
                update_rule=rule.name,
            )
            for index in range(len(specs))
        ]

    def _kept_loop(self, key: tuple, epochs: int, compile: Callable[[], _CompiledLoop]) -> _CompiledLoop:
        """The loop kept for `key` when it records `epochs`, else compile()'s, kept in its place."""
        loop = self._loops.get(key)
        if loop is None or loop.capacity < epochs:
            loop = compile()
            self.compilations += 1
            self._loops[key] = loop
            while len(self._loops) > KEPT_LOOPS:
                self._loops.popitem(last=False)
        self._loops.move_to_end(key)
        return loop

    def export_model(self, plan: ModelPlan, parameters: list[np.ndarray], directory: Path) -> dict[str, str]:
        model = build_model(EXPORT_SETTINGS, plan)
        leaves = [np.asarray(values, dtype=np.float32) for values in parameters]
        if [np.shape(leaf) for leaf in leaves] != [shape for _, shape in model.layout]:
            raise ValueError(
                f"the parameters ({describe_layout([('', np.shape(leaf)) for leaf in leaves])}) do not "
                f"match the model's layout ({describe_layout(model.layout)})"
            )

        def predict(features):
            return jnp.reshape(model.apply([jnp.asarray(leaf) for leaf in leaves], features), (-1, 1))

        (rows,) = jax.export.symbolic_shape("rows")
        exported = jax.export.export(jax.jit(predict), platforms=EXPORT_PLATFORMS)(
            jax.ShapeDtypeStruct((rows, plan.feature_count), jnp.float32)
        )
        self.format_path(directory, "jax_export").write_bytes(exported.serialize())

        # Arrays only (no pickled objects): p0, p1, ... in layout order, and the activation
        # of each dense layer (none for a user model, whose architecture is its code).
        activations = [layer.activation for layer in plan.layers] if plan.user is None else []
        arrays = {f"p{index}": leaf for index, leaf in enumerate(leaves)}
        arrays[ACTIVATIONS_ENTRY] = np.asarray(activations, dtype=str)
        with self.format_path(directory, "jax_params").open("wb") as handle:
            np.savez(handle, **arrays)
        return {}

    def load_with_code(self, path: Path, format: str, plan: ModelPlan) -> Predictor:
        if format != "jax_params":
            return super().load_with_code(path, format, plan)
        model = build_model(EXPORT_SETTINGS, plan)
        with np.load(path, allow_pickle=False) as saved:
            leaves = [
                jnp.asarray(saved[f"p{index}"], dtype=jnp.float32) for index in range(len(model.layout))
            ]

        def predict(features: np.ndarray):
            return np.asarray(model.apply(leaves, jnp.asarray(features, dtype=jnp.float32))).reshape(-1, 1)

        return Predictor(plan.feature_count, predict)

    def model_loaders(self) -> dict[str, Callable[[Path], Predictor]]:
        return {"jax_export": _load_exported, "jax_params": _load_parameters}


@dataclass(frozen=True)
class JaxModel:
    """A model as JAX trains it: a pure function of a flat list of arrays, and their layout."""

    apply: Callable[[list[jax.Array], jax.Array], jax.Array]  # (leaves, features) -> outputs
    layout: list[tuple[str, tuple[int, ...]]]  # each leaf's name and shape, in order
    # A user builder's own parameter values (what init=framework starts from); None for a stack.
    own_start: list[np.ndarray] | None = None


def build_model(spec: JobSettings, plan: ModelPlan) -> JaxModel:
    """The plan as a function of its parameters: the dense stack, or what the user's build_jax returns."""
    if plan.user is not None:
        return _user_model(spec, plan)
    activations = tuple(layer.activation for layer in plan.layers)

    def apply(parameters, features):
        outputs = features
        for index, activation in enumerate(activations):
            outputs = ACTIVATIONS[activation](outputs @ parameters[2 * index] + parameters[2 * index + 1])
        return outputs

    return JaxModel(apply, plan.layout)


def _user_model(spec: JobSettings, plan: ModelPlan) -> JaxModel:
    source = plan.user
    built = user_models.build(plan, "jax", user_models.builder_config(spec))
    if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
        raise user_models.wrong_return(source, "jax", built, "a pair (apply, parameters)")
    user_apply, user_parameters = built
    with_paths, structure = jax.tree_util.tree_flatten_with_path(user_parameters)
    if not with_paths:
        raise user_models.wrong_return(source, "jax", user_parameters, "parameters holding arrays")
    # A list's (or a lone array's) parameters are named by place, any other pytree's by path.
    flat_list = isinstance(user_parameters, (list, tuple)) and all(len(path) == 1 for path, _ in with_paths)
    names = [
        f"param_{index}" if flat_list or not path else _path_name(path)
        for index, (path, _) in enumerate(with_paths)
    ]
    values = []
    for name, (_, leaf) in zip(names, with_paths):
        array = np.asarray(leaf)
        if array.dtype.kind not in "fiu":
            raise TypeError(
                f"{source.filename}: build_jax's parameter {name} is {type(leaf).__name__} of dtype "
                f"{array.dtype}, not an array of numbers"
            )
        values.append(array.astype(spec.dtype))

    def apply(parameters, features):
        outputs = user_apply(jax.tree_util.tree_unflatten(structure, list(parameters)), features)
        # Shapes are static while JAX traces, so this runs once, when the loop compiles.
        user_models.check_output_shape(source, "jax", jnp.shape(outputs), features.shape[0])
        return outputs

    layout = [(leaf_name, tuple(value.shape)) for leaf_name, value in zip(names, values)]
    return JaxModel(apply, layout, own_start=values)


def _path_name(path) -> str:
    """A pytree leaf's name from its path: dict keys, sequence indices and attributes, joined by /."""
    parts = []
    for entry in path:
        for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


# What a pack's jobs share (beyond the model and the data), whatever jobs/plan/packing.py grows to.
PACKED_SETTINGS = ("variant", "dtype", "optimizer", "loop", "batch_size", "epochs", "shared_start")


def _packed_settings(spec: JobSettings) -> tuple:
    # An initial value may differ between jobs, but not whether there is one.
    return (*(getattr(spec, name) for name in PACKED_SETTINGS), spec.initial_value is None)


def _member_models(specs: Sequence[JobSettings], plan: ModelPlan, data: TrainingData) -> list[JaxModel]:
    """Each job's model: one for a dense stack; a user's builder's, once a seed (it sees the seed).

    The pack runs one function for every job, so a builder whose function or layout
    depends on the seed (beyond its parameters' values) cannot pack.
    """
    if plan.user is None:
        return [build_model(specs[0], plan)] * len(specs)
    built: dict[int, JaxModel] = {}
    for spec in specs:
        if spec.seed not in built:
            built[spec.seed] = build_model(spec, plan)
    distinct = list(built.values())
    if any(model.layout != distinct[0].layout for model in distinct):
        raise PackingUnsupported("the user model's builder gives each seed parameters of other shapes")
    if len(distinct) > 1:
        try:
            traces = [_trace(model, specs[0].dtype, data.features) for model in distinct]
        except Exception as error:
            reason = f"the user model's apply does not trace: {_first_line(error)}"
            raise PackingUnsupported(reason) from error
        if any(not _same_trace(trace, traces[0]) for trace in traces):
            raise PackingUnsupported("the user model's builder gives each seed another function")
    return [built[spec.seed] for spec in specs]


def _trace(model: JaxModel, dtype: str, features: np.ndarray) -> tuple[str, list[np.ndarray]]:
    """The model's function as JAX sees it: its jaxpr's text and the constants it closes over."""
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for _, shape in model.layout]
    closed = jax.make_jaxpr(model.apply)(leaves, features)
    return str(closed.jaxpr), [np.asarray(constant) for constant in closed.consts]


def _same_trace(trace: tuple[str, list[np.ndarray]], other: tuple[str, list[np.ndarray]]) -> bool:
    (text, constants), (other_text, other_constants) = trace, other
    return (
        text == other_text
        and len(constants) == len(other_constants)
        and all(np.array_equal(mine, theirs) for mine, theirs in zip(constants, other_constants))
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def initialise_parameters(spec: JobSettings, plan: ModelPlan, model: JaxModel) -> list[np.ndarray]:
    """The shared start, every parameter at one value, or (init=framework) Keras's Glorot from jax.random."""
    shapes = [shape for _, shape in model.layout]
    if spec.shared_start:
        if plan.user is None and shapes != [shape for _, shape in plan.layout]:
            raise ValueError(
                f"the JAX model's parameters ({describe_layout(model.layout)}) do not match the plan's "
                f"({describe_layout(plan.layout)})"
            )
        return draw(shapes, spec.seed, spec.dtype)
    if spec.initial_value is not None:
        return [np.full(shape, spec.initial_value, dtype=spec.dtype) for shape in shapes]
    if model.own_start is not None:
        return list(model.own_start)
    # As Keras's Dense: Glorot-uniform kernels, zero biases; one key a parameter, from the seed.
    keys = jax.random.split(jax.random.key(spec.seed), len(shapes))
    glorot = jax.nn.initializers.glorot_uniform()
    return [
        np.asarray(glorot(key, shape, spec.dtype)) if len(shape) >= 2 else np.zeros(shape, spec.dtype)
        for key, shape in zip(keys, shapes)
    ]


class OwnUpdateRule:
    """workers/update_rules.py's Adam and SGD in jax.numpy, its state (and settings) a pytree.

    The learning rate and Adam's settings live in the state, so a compiled loop takes the
    next job's. They are kept in float64 and every coefficient (1 - beta_1, the bias
    corrections) is computed in float64 and then cast to the parameters' dtype, as torch
    computes them in Python floats and casts them in its kernels.
    """

    def __init__(self, optimizer: str) -> None:
        self.optimizer = optimizer
        self.name = OWN_RULE[optimizer]

    def initial_state(self, spec: JobSettings, parameters: list[jax.Array]) -> dict[str, Any]:
        settings = {"lr": np.float64(spec.lr)}
        if self.optimizer == "sgd":
            return settings
        return {
            **settings,
            "beta_1": np.float64(spec.beta_1),
            "beta_2": np.float64(spec.beta_2),
            "epsilon": np.float64(spec.epsilon),
            "step": np.int64(0),
            "first": [np.zeros(parameter.shape, parameter.dtype) for parameter in parameters],
            "second": [np.zeros(parameter.shape, parameter.dtype) for parameter in parameters],
        }

    def apply(self, parameters, gradients, state):
        dtype = parameters[0].dtype
        learning_rate = state["lr"].astype(dtype)
        if self.optimizer == "sgd":
            updated = [value - learning_rate * gradient for value, gradient in zip(parameters, gradients)]
            return updated, state
        step = state["step"] + 1
        beta_1, beta_2 = state["beta_1"], state["beta_2"]
        # 1 - beta**t for this step, t counted from 1.
        correction_1 = (1.0 - beta_1 ** step.astype(jnp.float64)).astype(dtype)
        correction_2 = (1.0 - beta_2 ** step.astype(jnp.float64)).astype(dtype)
        keep_1, take_1 = beta_1.astype(dtype), (1.0 - beta_1).astype(dtype)
        keep_2, take_2 = beta_2.astype(dtype), (1.0 - beta_2).astype(dtype)
        epsilon = state["epsilon"].astype(dtype)
        updated, firsts, seconds = [], [], []
        for parameter, gradient, first, second in zip(parameters, gradients, state["first"], state["second"]):
            first = keep_1 * first + take_1 * gradient
            second = keep_2 * second + take_2 * gradient * gradient
            update = (first / correction_1) * learning_rate / (jnp.sqrt(second / correction_2) + epsilon)
            updated.append(parameter - update)
            firsts.append(first)
            seconds.append(second)
        return updated, {**state, "step": step, "first": firsts, "second": seconds}


class StockUpdateRule:
    """optax's Adam or SGD (loop=article), its settings injected into its state for the same reuse."""

    def __init__(self, optimizer: str) -> None:
        try:
            import optax
        except ImportError:
            raise ValueError(
                "loop=article with JAX runs optax's optimizers, and optax is not installed; "
                "pip install 'runjobs[jax]', or use loop=fast"
            ) from None
        self.optax = optax
        self.optimizer = optimizer
        self.name = stock_rule("jax", optimizer)

    def _transformation(self, spec: JobSettings, dtype):
        optax = self.optax
        if self.optimizer == "sgd":
            return optax.inject_hyperparams(optax.sgd, hyperparam_dtype=dtype)(learning_rate=spec.lr)
        return optax.inject_hyperparams(optax.adam, hyperparam_dtype=dtype)(
            learning_rate=spec.lr, b1=spec.beta_1, b2=spec.beta_2, eps=spec.epsilon
        )

    def initial_state(self, spec: JobSettings, parameters: list[jax.Array]):
        self.transformation = self._transformation(spec, parameters[0].dtype)
        return self.transformation.init(list(parameters))

    def apply(self, parameters, gradients, state):
        # The update reads its settings from `state`, so any job's transformation serves.
        updates, state = self.transformation.update(list(gradients), state, list(parameters))
        return list(self.optax.apply_updates(list(parameters), updates)), state


def update_rule(spec: JobSettings) -> OwnUpdateRule | StockUpdateRule:
    """runjobs' own rule under loop=fast, optax's under loop=article."""
    if spec.loop == "fast":
        return OwnUpdateRule(spec.optimizer)
    return StockUpdateRule(spec.optimizer)


@dataclass
class _CompiledLoop:
    """A job's compiled functions, kept for the next job of the same shape."""

    capacity: int  # the most epochs `run` records; a longer job compiles again
    # (parameters, state, features, target, first epoch, end epoch, seed) -> (parameters, state,
    # losses, history): trains epochs first .. end - 1, recorded at those places of losses and history.
    run: Any
    predict: Any  # (parameters, prediction inputs) -> outputs
    fit: Any  # (parameters, features) -> outputs, or None for the linear model


def _loop_key(spec: JobSettings, plan: ModelPlan, data: TrainingData, device: Device) -> tuple:
    """What a compiled loop is specialised on: a job that differs in any of these compiles its own.

    Unlike TensorFlow's traced loop, the data enter as arguments, so only their shapes count.
    A user model's builder also sees the seed, which may shape its function.
    """
    return (
        repr(plan),
        spec.seed if plan.user is not None else None,
        spec.dtype,
        spec.loop,
        spec.optimizer,
        batch_size_for(spec.batch_size, data.rows),
        device.name,
        data.features.shape,
        data.prediction_inputs.shape,
    )


def _capacity(epochs: int) -> int:
    """The epochs a compiled loop records: the next power of two, so nearby epoch counts share it."""
    return 1 << max(0, math.ceil(math.log2(max(epochs, 1))))


def _compile(
    spec, plan, data, model: JaxModel, rule, arguments: tuple, prediction_inputs, packed: bool = False
) -> _CompiledLoop:
    """Lower and compile the run and the predictions for these arguments' shapes: set-up, not training.

    `arguments` are the run's: (parameters, state, features, target, first epoch, end epoch, seed).
    A `packed` loop trains many jobs at once: their parameters, rule states and seeds are
    stacked along a leading axis, and so are its results.
    """
    parameters, features = arguments[0], arguments[2]
    rows = data.rows
    batch = batch_size_for(spec.batch_size, rows)
    full_batches, remainder = divmod(rows, batch)
    capacity = _capacity(spec.epochs)
    keep_history = plan.is_linear
    dtype = jnp.dtype(spec.dtype)
    apply = model.apply

    def gradients_of(parameters, batch_features, batch_target):
        def loss(parameters):
            outputs = jnp.reshape(apply(parameters, batch_features), (-1, 1))
            squared_error = jnp.sum(jnp.square(outputs - batch_target))
            return squared_error / batch_features.shape[0], squared_error

        return jax.grad(loss, has_aux=True)(parameters)

    def step(carry, batch_features, batch_target):
        parameters, state, total = carry
        gradients, squared_error = gradients_of(parameters, batch_features, batch_target)
        parameters, state = rule.apply(parameters, gradients, state)
        return parameters, state, total + squared_error

    def run(parameters, state, features, target, first_epoch, end_epoch, seed):
        key = jax.random.key(seed)

        def epoch_body(epoch, carry):
            parameters, state, losses, history = carry
            carry = (parameters, state, jnp.zeros((), dtype))
            if full_batches == 1 and remainder == 0:
                carry = step(carry, features, target)
            else:
                # Keras fit's meaning of an epoch: every row once, in a fresh order.
                order = jax.random.permutation(jax.random.fold_in(key, epoch), rows)
                if full_batches:
                    batches = order[: full_batches * batch].reshape(full_batches, batch)
                    carry, _ = jax.lax.scan(
                        lambda carry, indices: (step(carry, features[indices], target[indices]), None),
                        carry,
                        batches,
                    )
                if remainder:
                    last = order[full_batches * batch :]
                    carry = step(carry, features[last], target[last])
            parameters, state, total = carry
            losses = losses.at[epoch].set(total / rows)
            if keep_history:
                history = history.at[epoch].set(jnp.concatenate([jnp.ravel(value) for value in parameters]))
            return parameters, state, losses, history

        width = sum(math.prod(shape) for _, shape in model.layout) if keep_history else 0
        losses = jnp.zeros(capacity, dtype)
        history = jnp.zeros((capacity if keep_history else 0, width), dtype)
        return jax.lax.fori_loop(first_epoch, end_epoch, epoch_body, (parameters, state, losses, history))

    def outputs(parameters, inputs):
        return jnp.reshape(apply(parameters, inputs), (-1,))

    if packed:
        # jax.vmap maps each job's own run over the stack, so nothing is reduced across jobs
        # and each draws its own shuffle from its own seed; the data and the epochs are shared.
        run = jax.vmap(run, in_axes=(0, 0, None, None, None, None, 0))
        outputs = jax.vmap(outputs, in_axes=(0, None))
    compiled_run = jax.jit(run).lower(*arguments).compile()
    compiled_predict = jax.jit(outputs).lower(parameters, prediction_inputs).compile()
    compiled_fit = None if plan.is_linear else jax.jit(outputs).lower(parameters, features).compile()
    return _CompiledLoop(capacity, compiled_run, compiled_predict, compiled_fit)


def _backends_started() -> bool:
    """Whether JAX has started its backends in this process (then its platforms are fixed)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private helper: assume started
        return True


def _gpu_devices() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no CUDA plugin, no usable GPU, or JAX kept on the CPU
        return []


def _platforms() -> set[str]:
    return {device.platform for device in jax.devices()}


def _jax_device(device: Device):
    return jax.devices("cpu")[0] if device.name == "cpu" else _gpu_devices()[0]


# ---- loading exported models -----------------------------------------------------------------


def _load_exported(path: Path) -> Predictor:
    """A model.jax_export: jax.export's serialised StableHLO (flatbuffers, never pickle), run as it is."""
    again = "give a model.jax_export written by runjobs submit --save-models"
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read it ({error}); {again}") from None
    except Exception as error:  # flatbuffers and MLIR fail in their own ways on a foreign file
        raise ModelLoadError(f"{path}: not a jax.export file ({type(error).__name__}); {again}") from None
    avals = exported.in_avals
    if (
        len(avals) != 1
        or len(avals[0].shape) != 2
        or avals[0].dtype != jnp.float32
        or not isinstance(avals[0].shape[1], int)
    ):
        raise ModelLoadError(
            f"{path}: takes {', '.join(str(aval) for aval in avals) or 'no input'}, not one float32 "
            f"[rows, features] array as runjobs' models do; {again}"
        )
    if "cpu" not in exported.platforms and not _gpu_devices():
        raise ModelLoadError(
            f"{path}: exported for {', '.join(exported.platforms)} only, and this machine has no GPU "
            f"for JAX; {again}"
        )
    targets = {pretty or generic for pretty, generic in CUSTOM_CALL.findall(exported.mlir_module())}
    foreign = sorted(targets - _stable_custom_calls())
    if foreign:
        # StableHLO itself cannot touch files or the network; a custom call runs whatever
        # native code the name is bound to in this process, so only JAX's own stable ones run.
        raise ModelLoadError(
            f"{path}: calls native code ({', '.join(foreign)}) that runjobs does not run; {again}"
        )
    feature_count = int(avals[0].shape[1])

    def predict(features: np.ndarray):
        return np.asarray(exported.call(np.asarray(features, dtype=np.float32))).reshape(-1, 1)

    return Predictor(feature_count, predict)


# A custom call's target in a module's text, in its pretty and its generic form.
CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w.$-]+)|call_target_name = "([^"]*)"')


def _stable_custom_calls() -> set[str]:
    """The custom calls jax.export itself allows in a module (shape assertions, JAX's own kernels)."""
    try:
        from jax._src.export._export import _CUSTOM_CALL_TARGETS_GUARANTEED_STABLE

        return set(_CUSTOM_CALL_TARGETS_GUARANTEED_STABLE)
    except ImportError:  # a JAX without this private name: what runjobs' own models use
        return {"shape_assertion"}


def _load_parameters(path: Path) -> Predictor:
    """A params.npz: the dense stack rebuilt from its arrays (read with allow_pickle=False)."""
    again = "give a params.npz written by runjobs submit --save-models"
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as error:
        # AttributeError: a plain .npy holds one array and has no `files`.
        raise ModelLoadError(
            f"{path}: not a .npz of arrays ({type(error).__name__}: {error}); runjobs reads parameters "
            f"with allow_pickle=False and never unpickles; {again}"
        ) from None
    count = sum(1 for name in arrays if name.startswith("p") and name[1:].isdigit())
    parameters = [arrays.get(f"p{index}") for index in range(count)]
    if count == 0 or count % 2 or any(values is None for values in parameters):
        raise ModelLoadError(
            f"{path}: holds {', '.join(sorted(arrays))}, not p0, p1, ... of a dense stack; {again}"
        )
    activations = _activations(path, arrays, count // 2)
    expected = int(parameters[0].shape[0]) if parameters[0].ndim == 2 else None
    for index, activation in enumerate(activations):
        kernel, bias = parameters[2 * index], parameters[2 * index + 1]
        if (
            kernel.ndim != 2
            or bias.ndim != 1
            or kernel.shape[0] != expected
            or bias.shape[0] != kernel.shape[1]
            or activation not in ACTIVATIONS
            or kernel.dtype.kind != "f"
            or bias.dtype.kind != "f"
        ):
            raise ModelLoadError(
                f"{path}: layer {index} (kernel {list(kernel.shape)}, bias {list(bias.shape)}, "
                f"{activation}) is not a dense layer after the one before; {again}"
            )
        expected = int(kernel.shape[1])
    if expected != 1:
        raise ModelLoadError(f"{path}: the last layer has {expected} outputs, not 1; {again}")
    leaves = [jnp.asarray(values, dtype=jnp.float32) for values in parameters]
    model = build_model(EXPORT_SETTINGS, _stack_plan(leaves, activations))

    def predict(features: np.ndarray):
        return np.asarray(model.apply(leaves, jnp.asarray(features, dtype=jnp.float32))).reshape(-1, 1)

    return Predictor(int(parameters[0].shape[0]), predict)


def _activations(path: Path, arrays: dict[str, np.ndarray], layers: int) -> list[str]:
    """Each layer's activation: from the file, else the manifest's `layers` beside it, else linear for one."""
    if ACTIVATIONS_ENTRY in arrays:
        activations = [str(name) for name in np.asarray(arrays[ACTIVATIONS_ENTRY]).reshape(-1)]
        if not activations:
            raise ModelLoadError(
                f"{path}: holds a user model's parameters, whose architecture is its code; load the "
                "model.jax_export beside it instead"
            )
    else:
        from workers.export import MANIFEST, manifest_beside, manifest_layers

        described = manifest_layers(manifest_beside(path), path.parent / MANIFEST)
        if described is not None:
            activations = [layer.activation for layer in described]
        elif layers == 1:
            activations = ["linear"]
        else:
            raise ModelLoadError(
                f"{path}: the parameters of {layers} layers, and neither the file nor a {MANIFEST} "
                "beside it names their activations; give a params.npz written by runjobs submit --save-models"
            )
    if len(activations) != layers:
        raise ModelLoadError(
            f"{path}: {layers} layer(s) of parameters but {len(activations)} activation(s); give a "
            "params.npz written by runjobs submit --save-models"
        )
    return activations


def _stack_plan(leaves: list, activations: list[str]) -> ModelPlan:
    from workers.models import DenseLayer

    layers = tuple(
        DenseLayer(int(leaves[2 * index].shape[0]), int(leaves[2 * index].shape[1]), activation)
        for index, activation in enumerate(activations)
    )
    return ModelPlan("params.npz", layers[0].inputs, layers)
