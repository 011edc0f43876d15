"""PyTorch: the job's model (an nn.Linear, a stack, or a user's nn.Module) on the device Ray assigned.

One training function serves `single` and `ddp`: with a world size above 1 it joins the
job's process group (nccl on GPUs, gloo on the CPU), wraps the model in
DistributedDataParallel, and takes its share of every global batch; it unwraps and
leaves the group at the end. PyTorch's quickest path for these small models is its
plain eager loop (torch.compile costs seconds that 500 tiny steps never win back).
`fast` updates the parameters with runjobs' own rule (workers/update_rules.py, the same
arithmetic as the other frameworks); `article` with torch.optim, as the article did.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.devices import choose_device
from workers.distributed import SINGLE_WORKER, WorkerContext
from workers.frameworks.base import Framework, JobSettings, ModelLoadError, Predictor
from workers.frameworks.onnx_format import ONNX_OPSET, missing_converter, one_line
from workers.models import ModelPlan
from workers.models import user as user_models
from workers.models.shared_start import describe_layout, draw
from workers.training import Device, TrainerOutcome, TrainingData, batch_size_for
from workers.update_rules import OWN_RULE, bias_corrections, stock_rule


class TorchFramework(Framework):
    """PyTorch behind the framework interface; it keeps no state between jobs."""

    # ddp is the same training function as single, with a world size above 1.
    trained_variants = ("single", "ddp")

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
        self, spec: JobSettings, model: ModelPlan, data: TrainingData, device: Device, context: WorkerContext
    ) -> TrainerOutcome:
        setup_started = time.perf_counter()
        target_device = torch.device(device.name)
        with _process_group(context, target_device) as backend:
            # The DDP wrapper lives only inside _train_on_rank: it is gone before the group is
            # destroyed. A DistributedDataParallel (its Reducer) that outlives
            # destroy_process_group() holds the last reference to the gloo group, and the
            # group's destructor can then hang joining its threads.
            outcome = _train_on_rank(spec, model, data, target_device, context, setup_started)
        if context.is_distributed:
            outcome.distribution = {"backend": backend, "devices": [device.name]}
        return outcome

    def export_model(self, plan: ModelPlan, parameters: list[np.ndarray], directory: Path) -> dict[str, str]:
        feature_count = plan.feature_count
        model = build_model(EXPORT_SETTINGS, plan)
        with torch.no_grad():
            for parameter, values in zip(model.parameters(), parameters):
                canonical(parameter).copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)))
        model.eval()
        # TorchScript: code and tensors only, so loading it runs no pickled Python objects.
        torch.jit.script(model).save(str(self.format_path(directory, "torchscript")))
        torch.save(model.state_dict(), self.format_path(directory, "state_dict"))

        # torch 2.13's exporter (dynamo, the default) builds the graph with onnxscript.
        missing = missing_converter("onnx", "onnxscript")
        if missing:
            return {"onnx": missing}
        try:
            torch.onnx.export(
                model,
                (torch.zeros(1, feature_count),),
                str(self.format_path(directory, "onnx")),
                input_names=["features"],
                output_names=["prediction"],
                dynamic_shapes=({0: torch.export.Dim("rows")},),
                opset_version=ONNX_OPSET,
                external_data=False,  # one self-contained file
                verbose=False,
            )
        except Exception as error:  # an optional converter's failure must not lose the job
            return {"onnx": f"torch.onnx.export failed: {one_line(error)}"}
        return {}

    def model_loaders(self) -> dict[str, Callable[[Path], Predictor]]:
        return {"torchscript": _load_torchscript, "state_dict": _load_state_dict}


@dataclass(frozen=True)
class _ExportSettings:
    """What build_model reads when a model is rebuilt for export: exported models take float32."""

    dtype: str = "float32"
    seed: int = 0


EXPORT_SETTINGS = _ExportSettings()
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}  # GELU: exact (erf)


def build_model(spec: JobSettings, plan: ModelPlan) -> torch.nn.Module:
    """The plan as torch modules: an nn.Linear for the linear model, an nn.Sequential for a stack."""
    dtype = getattr(torch, spec.dtype)
    if plan.user is not None:
        model = user_models.build(plan, "torch", {"dtype": spec.dtype, "seed": spec.seed})
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"{plan.user.name}: build_torch returned {type(model).__name__}, not an nn.Module"
            )
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


def _train_on_rank(spec, plan, data, target_device, context, setup_started) -> TrainerOutcome:
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
    for _ in range(spec.epochs):
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
    )


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


def _load_torchscript(path: Path) -> Predictor:
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    feature_count = getattr(module, "in_features", None)

    def predict(features: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(features)).numpy()

    return Predictor(feature_count, predict)


def _load_state_dict(path: Path) -> Predictor:
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
    weight = state.get("weight") if isinstance(state, dict) else None
    bias = state.get("bias") if isinstance(state, dict) else None
    if (
        not isinstance(weight, torch.Tensor)
        or not isinstance(bias, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[0] != 1
        or tuple(bias.shape) != (1,)
    ):
        raise ModelLoadError(
            f"{path} is not the state_dict of an nn.Linear(K, 1) (keys weight [1, K] and bias [1]); "
            "give a state_dict.pt written by runjobs submit --save-models"
        )
    model = torch.nn.Linear(weight.shape[1], 1)
    model.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    model.eval()

    def predict(features: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy()

    return Predictor(int(weight.shape[1]), predict)
