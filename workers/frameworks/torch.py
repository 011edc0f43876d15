"""PyTorch: the job's model (an nn.Linear, a stack, or a user's nn.Module) on the device Ray assigned.

One training function serves `single` and `ddp`: with a world size above 1 it joins the
job's process group (nccl on GPUs, gloo on the CPU), wraps the model in
DistributedDataParallel, and takes its share of every global batch; it unwraps and
leaves the group at the end. PyTorch's quickest path for these small models is its
plain eager loop (torch.compile costs seconds that 500 tiny steps never win back).
`fast` updates the parameters with runjobs' own rule (workers/update_rules.py, the same
arithmetic as the other frameworks); `article` with torch.optim, as the article did.
A job that reports its loss (workers/reporting.py) runs the same epochs in chunks and
reports after each.

Exports TorchScript (code and tensors, no pickled Python objects), a state_dict, and
ONNX when its converter is installed; reads TorchScript and state_dicts back without
unpickling anything but tensors. Importing this module imports torch; the registry
imports it only for a job, export or prediction that needs torch.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from workers.devices import choose_device
from workers.distributed import SINGLE_WORKER, WorkerContext
from workers.frameworks.base import (
    EXPORT_SETTINGS,
    Framework,
    JobSettings,
    ModelLoadError,
    PackingUnsupported,
    Predictor,
)
from workers.frameworks.onnx_format import ONNX_OPSET, one_line, write_checked
from workers.models import ModelPlan
from workers.models import user as user_models
from workers.models.shared_start import describe_layout, draw
from workers.reporting import ReportSchedule, TrainingMonitor
from workers.training import Device, TrainerOutcome, TrainingData, batch_size_for
from workers.update_rules import OWN_RULE, bias_corrections, stock_rule


class TorchFramework(Framework):
    """PyTorch behind the framework interface; it keeps no state between jobs."""

    # ddp is the same training function as single, with a world size above 1.
    trained_variants = ("single", "ddp")
    reports_progress = True
    packs = True

    def initialise(
        self,
        gpu_ids: tuple[str, ...],
        allow_cpu_fallback: bool,
        spec: JobSettings,
        context: WorkerContext = SINGLE_WORKER,
    ) -> Device:
        """Pick the device for Ray's assignment: CUDA_VISIBLE_DEVICES makes it cuda:0."""
        visible = torch.cuda.device_count() if gpu_ids and torch.cuda.is_available() else 0
        device = choose_device(
            "torch",
            gpu_ids,
            visible,
            "cuda:0",
            allow_cpu_fallback,
            f"torch {self.version} built with CUDA {torch.version.cuda}",
        )
        torch.zeros(1, device=device.name)  # start the runtime (and CUDA context) now
        # The first optimizer construction imports torch._dynamo (about 1 s here); that is
        # framework start-up, so pay it now rather than inside the job's set-up time.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        return device

    def train_variant(
        self,
        spec: JobSettings,
        model: ModelPlan,
        data: TrainingData,
        device: Device,
        context: WorkerContext,
        monitor: TrainingMonitor | None = None,
    ) -> TrainerOutcome:
        setup_started = time.perf_counter()
        schedule = ReportSchedule.for_job(spec, monitor)
        target_device = torch.device(device.name)
        with _process_group(context, target_device) as backend:
            # The DDP wrapper lives only inside _train_on_rank: it is gone before the group is
            # destroyed. A DistributedDataParallel (its Reducer) that outlives
            # destroy_process_group() holds the last reference to the gloo group, and the
            # group's destructor can then hang joining its threads.
            outcome = _train_on_rank(spec, model, data, target_device, context, schedule, setup_started)
        if context.is_distributed:
            outcome.distribution = {"backend": backend, "devices": [device.name]}
        return outcome

    def train_pack(
        self, specs: Sequence[JobSettings], model: ModelPlan, data: TrainingData, device: Device
    ) -> list[TrainerOutcome]:
        if specs[0].loop != "fast":
            raise PackingUnsupported("loop=article trains with torch.optim, one job at a time")
        return _train_pack(list(specs), model, data, torch.device(device.name))

    def export_model(self, plan: ModelPlan, parameters: list[np.ndarray], directory: Path) -> dict[str, str]:
        feature_count = plan.feature_count
        # A user model is rebuilt by calling the user's build_torch (float32, seed 0); its
        # parameters then take the learned values, in the order the trainer handed them back.
        model = build_model(EXPORT_SETTINGS, plan)
        _load_parameters(model, plan, parameters)
        model.eval()
        not_written: dict[str, str] = {}
        if plan.user is None:
            # TorchScript: code and tensors only, so loading it runs no pickled Python objects.
            torch.jit.script(model).save(str(self.format_path(directory, "torchscript")))
        else:
            compiled, failure = _user_torchscript(model, plan)
            if compiled is None:
                not_written["torchscript"] = failure
            else:
                compiled.save(str(self.format_path(directory, "torchscript")))
        # Always written: a dense stack's is read back with model.json's layers; a user
        # model's needs the user's code to rebuild the module it fits.
        torch.save(model.state_dict(), self.format_path(directory, "state_dict"))

        onnx_path = self.format_path(directory, "onnx")

        def convert() -> None:
            torch.onnx.export(
                model,
                (torch.zeros(1, feature_count),),
                str(onnx_path),
                input_names=["features"],
                output_names=["prediction"],
                dynamic_shapes=({0: torch.export.Dim("rows")},),
                opset_version=ONNX_OPSET,
                external_data=False,  # one self-contained file
                verbose=False,
            )

        def compute(rows: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(rows)).numpy()

        # torch 2.13's exporter (dynamo, the default) builds the graph with onnxscript.
        reason = write_checked(
            "torch.onnx.export", ("onnx", "onnxscript"), onnx_path, convert, feature_count, compute
        )
        return not_written if reason is None else {**not_written, "onnx": reason}

    def load_with_code(self, path: Path, format: str, plan: ModelPlan) -> Predictor:
        if format != "state_dict":
            return super().load_with_code(path, format, plan)
        model = build_model(EXPORT_SETTINGS, plan)
        # The tensors still load with weights_only: trusting the code is not trusting pickles.
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()

        def predict(features: np.ndarray):
            with torch.inference_mode():
                return model(torch.from_numpy(features)).reshape(-1, 1).numpy()

        return Predictor(plan.feature_count, predict)

    def model_loaders(self) -> dict[str, Callable[[Path], Predictor]]:
        return {"torchscript": _load_torchscript, "state_dict": _load_state_dict}


ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}  # GELU: exact (erf)


def build_model(spec: JobSettings, plan: ModelPlan) -> torch.nn.Module:
    """The plan as torch modules: an nn.Linear for the linear model, an nn.Sequential for a stack."""
    dtype = getattr(torch, spec.dtype)
    if plan.user is not None:
        model = user_models.build(plan, "torch", user_models.builder_config(spec))
        if not isinstance(model, torch.nn.Module):
            raise user_models.wrong_return(plan.user, "torch", model, "an nn.Module")
        return model.to(dtype)
    modules: list[torch.nn.Module] = []
    for layer in plan.layers:
        modules.append(torch.nn.Linear(layer.inputs, layer.outputs, dtype=dtype))
        if layer.activation != "linear":
            modules.append(ACTIVATIONS[layer.activation]())
    return modules[0] if plan.is_linear else torch.nn.Sequential(*modules)


def canonical(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter in the canonical layout: nn.Linear keeps its kernel as [outputs, inputs]."""
    return parameter.T if parameter.dim() == 2 else parameter


def layout_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(canonical(parameter).shape)) for name, parameter in model.named_parameters()]


def initialise_parameters(spec: JobSettings, plan: ModelPlan, model: torch.nn.Module) -> None:
    """The shared start, every parameter at one value, or (init=framework) torch's own initialiser."""
    with torch.no_grad():
        if spec.shared_start:
            layout = layout_of(model)
            if plan.user is None and [shape for _, shape in layout] != [shape for _, shape in plan.layout]:
                raise ValueError(
                    f"the torch model's parameters ({describe_layout(layout)}) do not match the plan's "
                    f"({describe_layout(plan.layout)})"
                )
            drawn = draw([shape for _, shape in layout], spec.seed, spec.dtype)
            for parameter, values in zip(model.parameters(), drawn):
                canonical(parameter).copy_(torch.from_numpy(values))
        elif spec.initial_value is not None:
            for parameter in model.parameters():
                parameter.fill_(spec.initial_value)


class OwnUpdateRule:
    """workers/update_rules.py's Adam and SGD in torch operations (the _foreach kernels torch.optim uses)."""

    def __init__(self, spec: JobSettings, parameters: list[torch.Tensor]) -> None:
        self.spec = spec
        self.parameters = parameters
        self.first = [torch.zeros_like(parameter) for parameter in parameters]
        self.second = [torch.zeros_like(parameter) for parameter in parameters]
        self.step_number = 0

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        spec = self.spec
        gradients = [parameter.grad for parameter in self.parameters]
        if spec.optimizer == "sgd":
            torch._foreach_add_(self.parameters, gradients, alpha=-spec.lr)
            return
        self.step_number += 1
        correction_1, correction_2 = bias_corrections(spec.beta_1, spec.beta_2, self.step_number)
        torch._foreach_mul_(self.first, spec.beta_1)
        torch._foreach_add_(self.first, gradients, alpha=1 - spec.beta_1)
        torch._foreach_mul_(self.second, spec.beta_2)
        torch._foreach_addcmul_(self.second, gradients, gradients, value=1 - spec.beta_2)
        denominator = torch._foreach_div(self.second, correction_2)
        torch._foreach_sqrt_(denominator)
        torch._foreach_add_(denominator, spec.epsilon)
        update = torch._foreach_div(self.first, correction_1)
        torch._foreach_mul_(update, spec.lr)
        torch._foreach_div_(update, denominator)
        torch._foreach_sub_(self.parameters, update)


def _optimizer(spec: JobSettings, parameters) -> tuple[object, str]:
    if spec.loop == "fast":
        return OwnUpdateRule(spec, list(parameters)), OWN_RULE[spec.optimizer]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=spec.lr), stock_rule("torch", "sgd")
    optimizer = torch.optim.Adam(parameters, lr=spec.lr, betas=(spec.beta_1, spec.beta_2), eps=spec.epsilon)
    return optimizer, stock_rule("torch", "adam")


def _train_on_rank(
    spec, plan, data, target_device, context, schedule: ReportSchedule, setup_started
) -> TrainerOutcome:
    torch.manual_seed(spec.seed)
    model = build_model(spec, plan)
    initialise_parameters(spec, plan, model)
    model = model.to(target_device)
    trained = model
    if context.is_distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[target_device.index or 0] if target_device.type == "cuda" else None
        )
    optimizer, update_rule = _optimizer(spec, trained.parameters())
    features = torch.from_numpy(data.features).to(target_device)
    target = torch.from_numpy(data.target).to(target_device)
    if plan.user is not None:  # the loss reshapes outputs to [-1, 1], which would hide [rows, 3]
        with torch.no_grad():
            probe = features[:2]
            user_models.check_output_shape(plan.user, "torch", model.eval()(probe).shape, len(probe))
        model.train()
    rows = data.rows
    batch = batch_size_for(spec.batch_size, rows)
    # Every rank draws the same order from the same seed, as the single-device twin does.
    shuffler = torch.Generator().manual_seed(spec.seed)
    synchronise = torch.cuda.synchronize if target_device.type == "cuda" else (lambda: None)
    keep_history = plan.is_linear

    def apply_step(batch_features, batch_target, global_batch_size):
        # DDP averages gradients over the ranks, so dividing the summed loss by
        # global batch / world size makes the averaged gradient exactly the global
        # batch's mean gradient.
        optimizer.zero_grad()
        squared_error = ((trained(batch_features).reshape(-1, 1) - batch_target) ** 2).sum()
        (squared_error / (global_batch_size / context.world_size)).backward()
        optimizer.step()
        return squared_error.detach()

    def step(indices):
        # This rank takes every world_size-th row of the global batch.
        mine = indices[context.rank :: context.world_size]
        return apply_step(features[mine], target[mine], len(indices))

    # With the full batch every step sees the same rows: cut this rank's shard once.
    shard_features = features[context.rank :: context.world_size]
    shard_target = target[context.rank :: context.world_size]

    setup_s = time.perf_counter() - setup_started
    epoch_errors = []
    epoch_parameters = []
    epoch_seconds = []
    train_started = time.perf_counter()
    # The whole run, or the chunks of a job that reports: the same epochs one after another.
    for first, last in schedule.chunks():
        for _ in range(first, last):
            epoch_started = time.perf_counter()
            if batch >= rows:
                total = apply_step(shard_features, shard_target, rows)
            else:
                order = torch.randperm(rows, generator=shuffler).to(target_device)
                total = torch.zeros((), device=target_device, dtype=features.dtype)
                for start in range(0, rows, batch):
                    total += step(order[start : start + batch])
            epoch_errors.append(total)
            if keep_history:
                # A device-side copy per epoch; moved to the host once, with the losses.
                epoch_parameters.append(torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]))
            synchronise()
            epoch_seconds.append(time.perf_counter() - epoch_started)
        # The same division as the history's below, so the report is its value exactly.
        if schedule.stop_after(last, epoch_errors[-1] / rows):
            break
    # One transfer (and, with DDP, one all-reduce) for the whole loss history instead
    # of a sync every epoch.
    errors = torch.stack(epoch_errors) if epoch_errors else torch.zeros(0, device=target_device)
    if context.is_distributed:
        torch.distributed.all_reduce(errors)
    losses = (errors / rows).cpu().tolist()
    parameter_history = None
    if keep_history:
        parameter_history = (
            torch.stack(epoch_parameters).cpu().numpy().astype(np.float64)
            if epoch_parameters
            else np.zeros((0, plan.feature_count + 1))
        )
    train_s = time.perf_counter() - train_started

    predict_started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        inputs = torch.from_numpy(data.prediction_inputs).to(target_device)
        predictions = model(inputs).reshape(-1).cpu().numpy() if len(inputs) else np.zeros(0)
        fitted = None if plan.is_linear else model(features).reshape(-1).cpu().numpy().astype(np.float64)
    predict_s = time.perf_counter() - predict_started

    return TrainerOutcome(
        parameters=[
            canonical(parameter.detach()).cpu().numpy().astype(np.float64) for parameter in model.parameters()
        ],
        loss_history=[float(value) for value in losses],
        epoch_seconds=epoch_seconds,
        parameter_history=parameter_history,
        predictions=predictions,
        setup_s=setup_s,
        train_s=train_s,
        predict_s=predict_s,
        fitted=fitted,
        parameter_names=[name for name, _ in model.named_parameters()],
        update_rule=update_rule,
        stopped_at_epoch=schedule.stopped_at_epoch,
    )


class PackedUpdateRule:
    """OwnUpdateRule for a pack: every parameter stacked along a leading job axis, each job its settings.

    The coefficients (1 - beta_1, the bias corrections) are computed per job in float64
    and cast to the parameters' dtype, as torch casts OwnUpdateRule's Python floats.
    """

    def __init__(self, specs: list[JobSettings], parameters: list[torch.Tensor]) -> None:
        self.optimizer = specs[0].optimizer
        self.parameters = parameters
        self.first = [torch.zeros_like(parameter) for parameter in parameters]
        self.second = [torch.zeros_like(parameter) for parameter in parameters]
        self.step_number = 0
        self.settings = {
            name: np.asarray([getattr(spec, name) for spec in specs], dtype=np.float64)
            for name in ("lr", "beta_1", "beta_2", "epsilon")
        }
        # Each setting as a column that broadcasts over a parameter of any rank.
        self.columns: dict[tuple[str, int], torch.Tensor] = {}

    def _column(self, values: np.ndarray, rank: int) -> torch.Tensor:
        reference = self.parameters[0]
        column = torch.from_numpy(values).to(dtype=reference.dtype, device=reference.device)
        return column.reshape(-1, *([1] * (rank - 1)))

    def _setting(self, name: str, rank: int, values: np.ndarray | None = None) -> torch.Tensor:
        if values is not None:
            return self._column(values, rank)
        if (name, rank) not in self.columns:
            self.columns[name, rank] = self._column(self.settings[name], rank)
        return self.columns[name, rank]

    @torch.no_grad()
    def step(self, gradients: list[torch.Tensor]) -> None:
        settings = self.settings
        if self.optimizer == "sgd":
            for parameter, gradient in zip(self.parameters, gradients):
                parameter.sub_(self._setting("lr", parameter.dim()) * gradient)
            return
        self.step_number += 1
        correction_1 = 1.0 - settings["beta_1"] ** self.step_number
        correction_2 = 1.0 - settings["beta_2"] ** self.step_number
        for parameter, gradient, first, second in zip(self.parameters, gradients, self.first, self.second):
            rank = parameter.dim()
            first.mul_(self._setting("beta_1", rank)).add_(
                gradient * self._setting("take_1", rank, 1 - settings["beta_1"])
            )
            second.mul_(self._setting("beta_2", rank)).add_(
                gradient * gradient * self._setting("take_2", rank, 1 - settings["beta_2"])
            )
            denominator = (
                (second / self._setting("c2", rank, correction_2))
                .sqrt_()
                .add_(self._setting("epsilon", rank))
            )
            update = (first / self._setting("c1", rank, correction_1)).mul_(self._setting("lr", rank))
            parameter.sub_(update.div_(denominator))


def _train_pack(
    specs: list[JobSettings], plan: ModelPlan, data: TrainingData, target_device: torch.device
) -> list[TrainerOutcome]:
    """Train a pack with torch.func: one module's functional call, vmapped over the stacked parameters."""
    from torch.func import functional_call, grad, vmap

    setup_started = time.perf_counter()
    first_spec = specs[0]
    torch.manual_seed(first_spec.seed)
    template = build_model(first_spec, plan).to(target_device)
    names = [name for name, _ in template.named_parameters()]
    stacked = {name: values.to(target_device) for name, values in _starts(specs, plan, template).items()}
    features = torch.from_numpy(data.features).to(target_device)
    target = torch.from_numpy(data.target).to(target_device)
    if plan.user is not None:
        with torch.no_grad():
            probe = features[:2]
            user_models.check_output_shape(plan.user, "torch", template.eval()(probe).shape, len(probe))
        template.train()

    def loss_of(parameters, batch_features, batch_target):
        outputs = functional_call(template, parameters, (batch_features,)).reshape(-1, 1)
        squared_error = ((outputs - batch_target) ** 2).sum()
        return squared_error / batch_features.shape[0], squared_error.detach()

    shared_rows = vmap(grad(loss_of, has_aux=True), in_dims=(0, None, None))
    gathered_rows = vmap(grad(loss_of, has_aux=True), in_dims=(0, 0, 0))
    outputs_of = vmap(
        lambda parameters, inputs: functional_call(template, parameters, (inputs,)), in_dims=(0, None)
    )
    rule = PackedUpdateRule(specs, [stacked[name] for name in names])
    rows = data.rows
    batch = batch_size_for(first_spec.batch_size, rows)
    shufflers = [torch.Generator().manual_seed(spec.seed) for spec in specs]
    synchronise = torch.cuda.synchronize if target_device.type == "cuda" else (lambda: None)
    keep_history = plan.is_linear
    size = len(specs)

    def apply_step(step_gradients, batch_features, batch_target):
        try:
            gradients, squared_error = step_gradients(stacked, batch_features, batch_target)
        except RuntimeError as error:  # what torch.func cannot batch: in-place ops, dropout, .item()
            raise PackingUnsupported(f"torch.func cannot vectorise {plan.name}: {one_line(error)}") from error
        rule.step([gradients[name] for name in names])
        return squared_error

    setup_s = time.perf_counter() - setup_started
    epoch_errors, epoch_parameters, epoch_seconds = [], [], []
    train_started = time.perf_counter()
    for _ in range(first_spec.epochs):
        epoch_started = time.perf_counter()
        if batch >= rows:
            total = apply_step(shared_rows, features, target)
        else:
            orders = torch.stack([torch.randperm(rows, generator=shuffler) for shuffler in shufflers]).to(
                target_device
            )
            total = torch.zeros(size, device=target_device, dtype=features.dtype)
            for start in range(0, rows, batch):
                indices = orders[:, start : start + batch]
                total += apply_step(gathered_rows, features[indices], target[indices])
        epoch_errors.append(total)
        if keep_history:
            weight, bias = (stacked[name].detach() for name in names)
            epoch_parameters.append(torch.cat([weight.reshape(size, -1), bias.reshape(size, -1)], dim=1))
        synchronise()
        epoch_seconds.append(time.perf_counter() - epoch_started)
    losses = (torch.stack(epoch_errors, dim=1) / rows).cpu().numpy().astype(np.float64)
    history = torch.stack(epoch_parameters, dim=1).cpu().numpy().astype(np.float64) if keep_history else None
    train_s = time.perf_counter() - train_started

    predict_started = time.perf_counter()
    template.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(data.prediction_inputs).to(target_device)
        predictions = (
            outputs_of(stacked, inputs).reshape(size, -1).cpu().numpy()
            if len(inputs)
            else np.zeros((size, 0))
        )
        fitted = None if plan.is_linear else outputs_of(stacked, features).reshape(size, -1).cpu().numpy()
    predict_s = time.perf_counter() - predict_started

    learned = [canonical_stack(stacked[name]).cpu().numpy().astype(np.float64) for name in names]
    return [
        TrainerOutcome(
            parameters=[values[index] for values in learned],
            loss_history=losses[index].tolist(),
            epoch_seconds=epoch_seconds,
            parameter_history=None if history is None else history[index],
            predictions=predictions[index],
            setup_s=setup_s,
            train_s=train_s,
            predict_s=predict_s,
            fitted=None if fitted is None else fitted[index].astype(np.float64),
            parameter_names=names,
            update_rule=OWN_RULE[first_spec.optimizer],
        )
        for index in range(size)
    ]


def _starts(specs: list[JobSettings], plan: ModelPlan, template: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every job's starting parameters, stacked: each as it would start alone."""
    first_spec = specs[0]
    dtype = getattr(torch, first_spec.dtype)
    named = list(template.named_parameters())
    if plan.user is None and first_spec.initial_value is not None and not first_spec.shared_start:
        values = torch.tensor([spec.initial_value for spec in specs], dtype=dtype)
        return {
            name: values.reshape(-1, *([1] * parameter.dim())).expand(len(specs), *parameter.shape).clone()
            for name, parameter in named
        }
    if first_spec.shared_start and plan.user is None:
        shapes = [tuple(canonical(parameter).shape) for _, parameter in named]
        drawn = [draw(shapes, spec.seed, spec.dtype) for spec in specs]
        return {
            name: canonical_stack(torch.from_numpy(np.stack([member[index] for member in drawn])))
            for index, (name, _) in enumerate(named)
        }
    # The framework's own initialiser, or a user model: each job's module, built after its
    # own seed, as it is alone. A user's builder sees the seed and may build another model
    # for another seed; the pack runs the template's code, so every member must match it.
    members = []
    template_buffers = dict(template.named_buffers())
    for spec in specs:
        # The CPU generator alone: a module is initialised on the CPU, and torch.manual_seed
        # would also queue a seed for every lazily initialised accelerator, with a stack
        # trace each (0.7 ms a job here).
        torch.random.default_generator.manual_seed(spec.seed)
        member = build_model(spec, plan)
        initialise_parameters(spec, plan, member)
        if plan.user is not None:
            _check_same_model(plan, spec, template, template_buffers, member)
        members.append(dict(member.named_parameters()))
    return {name: torch.stack([member[name].detach() for member in members]) for name, _ in named}


def _check_same_model(plan, spec, template, template_buffers, member) -> None:
    """A user model's member as the pack's template is: the same parameters' shapes, the same buffers."""
    shapes = [(name, tuple(parameter.shape)) for name, parameter in member.named_parameters()]
    template_shapes = [(name, tuple(parameter.shape)) for name, parameter in template.named_parameters()]
    buffers = dict(member.named_buffers())
    same_buffers = buffers.keys() == template_buffers.keys() and all(
        buffers[name].shape == template_buffers[name].shape
        and torch.equal(buffers[name].to(template_buffers[name].device), template_buffers[name])
        for name in buffers
    )
    if shapes != template_shapes or not same_buffers:
        raise PackingUnsupported(
            f"{plan.name} builds another model for seed {spec.seed} than for the pack's first job"
        )


def canonical_stack(parameter: torch.Tensor) -> torch.Tensor:
    """canonical() for a pack's stacked parameter: each job's nn.Linear kernel transposed."""
    return parameter.transpose(1, 2) if parameter.dim() == 3 else parameter


@contextlib.contextmanager
def _process_group(context: WorkerContext, device: torch.device):
    """Join the job's process group for the block, and always leave it."""
    if not context.is_distributed:
        yield None
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{context.master_address}:{context.master_port}",
        rank=context.rank,
        world_size=context.world_size,
        timeout=datetime.timedelta(seconds=context.setup_timeout_s),
    )
    try:
        yield backend
        # Every rank is done with its collectives before any rank tears the group down.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _load_parameters(model: torch.nn.Module, plan: ModelPlan, parameters: list[np.ndarray]) -> None:
    """Give `model` the learned `parameters` (canonical: a 2-D one is nn.Linear's weight transposed)."""
    layout = layout_of(model)
    shapes = [tuple(np.shape(values)) for values in parameters]
    if [shape for _, shape in layout] != shapes:
        raise ValueError(
            f"{plan.name}: the rebuilt torch model's parameters ({describe_layout(layout)}) do not match "
            f"the {len(shapes)} learned ones ({', '.join(str(list(shape)) for shape in shapes)})"
        )
    with torch.no_grad():
        for parameter, values in zip(model.parameters(), parameters):
            canonical(parameter).copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)))


def _user_torchscript(model: torch.nn.Module, plan: ModelPlan):
    """A user's module as TorchScript: (the compiled module, None), or (None, why it could not be).

    torch.jit.script compiles forward's source, keeping any branch or loop that depends
    on the input; it reads the source through inspect, so the shipped text is put in
    linecache under the file's name (the worker may not have the file, or it may have been
    edited since the job was planned). Code TorchScript cannot compile (most Python beyond
    tensor operations) falls back to torch.jit.trace, which records the operations one
    float32 example runs: exact for a forward whose operations do not depend on the
    input's values or row count, which is checked on a second input of another size.
    """
    import linecache
    import warnings

    source = plan.user
    filename = source.filename
    previous = linecache.cache.get(filename)
    # mtime None: linecache.checkcache keeps the entry instead of rereading the file.
    linecache.cache[filename] = (len(source.text), None, source.text.splitlines(True), filename)
    try:
        try:
            return _checked_torchscript(model, torch.jit.script(model), plan.feature_count), None
        except Exception as error:
            scripting = one_line(error)
        try:
            example = torch.zeros(2, plan.feature_count, dtype=torch.float32)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(model, (example,), check_trace=False)
            return _checked_torchscript(model, traced, plan.feature_count), None
        except Exception as error:
            return None, f"torch.jit.script failed ({scripting}) and torch.jit.trace too ({one_line(error)})"
    finally:
        if previous is None:
            linecache.cache.pop(filename, None)
        else:
            linecache.cache[filename] = previous


def _checked_torchscript(model: torch.nn.Module, compiled, feature_count: int):
    """`compiled` when it computes what `model` does on an input it was not traced on; raises otherwise."""
    probe = torch.from_numpy(
        np.random.default_rng(0).uniform(-2.0, 2.0, size=(3, feature_count)).astype(np.float32)
    )
    with torch.no_grad():
        expected = model(probe).reshape(-1)
        got = compiled(probe).reshape(-1)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True):
        raise ValueError("the compiled module computes something else than the module on 3 rows")
    return compiled


def _manifest_feature_count(path: Path) -> int | None:
    from workers.export import manifest_beside

    count = (manifest_beside(path) or {}).get("feature_count")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _load_torchscript(path: Path) -> Predictor:
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    # nn.Linear says how many features it takes; a stack or a user's module does not, so
    # model.json beside it does.
    feature_count = getattr(module, "in_features", None)
    if not isinstance(feature_count, int):
        feature_count = _manifest_feature_count(path)

    def predict(features: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(features)).numpy()

    return Predictor(feature_count, predict)


def _load_state_dict(path: Path) -> Predictor:
    """A state_dict of a runjobs dense stack, rebuilt from model.json's layers (none: nn.Linear(K, 1)).

    Only tensors are read (torch.load(weights_only=True)); the module they fit is built
    here from the layers model.json beside the file lists, never from the file. A user
    model's state_dict fits a module only the user's code builds, which predict does not run.
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

    try:
        # weights_only: tensors and plain containers only; a pickled object is refused,
        # never constructed.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{path}: refused: it holds Python objects, not only tensors, and runjobs reads a state_dict "
            "with torch.load(weights_only=True), which never runs them; give a state_dict.pt written by "
            "runjobs submit --save-models"
        ) from None
    manifest = manifest_beside(path)
    user_model = manifest_user_model(manifest)
    if user_model is not None:
        raise ModelLoadError(
            f"{path}: the state_dict of user model {user_model_file(user_model)}, whose module only that "
            "code builds, and runjobs predict runs no model code; predict from "
            f"{readable_instead(path, manifest, 'state_dict')} instead, or in Python load it into "
            "build_torch(features, config) with load_state_dict(torch.load(path, weights_only=True))"
        )
    where = path.parent / MANIFEST
    layers = manifest_layers(manifest, where)
    if layers is None:
        if not _is_linear_state(state):
            beside = (
                f"{where} lists no layers" if manifest else f"no {MANIFEST} beside it lists a stack's layers"
            )
            raise ModelLoadError(
                f"{path} is not the state_dict of an nn.Linear(K, 1) (keys weight [1, K] and bias [1]) and "
                f"{beside}; give a state_dict.pt written by runjobs submit --save-models, in its directory"
            )
        layers = (DenseLayer(int(state["weight"].shape[1]), 1),)
    model = build_model(EXPORT_SETTINGS, ModelPlan("state_dict", layers[0].inputs, layers))
    problems = _state_dict_problems(model.state_dict(), state)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ModelLoadError(
            f"{path}: not the state_dict of the {_describe_layers(layers)} stack {MANIFEST} describes "
            f"({shown}); give the state_dict.pt written with that {MANIFEST}"
        )
    model.load_state_dict({key: value.float() for key, value in state.items()})
    model.eval()

    def predict(features: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy()

    return Predictor(layers[0].inputs, predict)


def _state_dict_problems(expected: dict[str, torch.Tensor], state) -> list[str]:
    """How `state` differs from the state_dict `expected` (keys, shapes, floating-point tensors)."""
    if not isinstance(state, dict):
        return [f"a {type(state).__name__}, not a dict of tensors"]
    problems = []
    for key, wanted in expected.items():
        value = state.get(key)
        shape = list(wanted.shape)
        if value is None:
            problems.append(f"missing {key} {shape}")
        elif not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"{key} is a {type(value).__name__}, not a floating-point tensor {shape}")
        elif list(value.shape) != shape:
            problems.append(f"{key} is {list(value.shape)}, not {shape}")
    problems += [f"unexpected {key}" for key in state if key not in expected]
    return problems


def _is_linear_state(state) -> bool:
    """An nn.Linear(K, 1)'s state_dict: weight [1, K] and bias [1], and nothing else."""
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        return False
    weight, bias = state["weight"], state["bias"]
    return (
        isinstance(weight, torch.Tensor)
        and isinstance(bias, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[0] == 1
        and tuple(bias.shape) == (1,)
    )


def _describe_layers(layers) -> str:
    """A stack as its sizes: `2 -> 8 relu -> 8 relu -> 1`."""
    sizes = [str(layers[0].inputs)]
    sizes += [f"{layer.outputs} {layer.activation}".removesuffix(" linear") for layer in layers]
    return " -> ".join(sizes)
