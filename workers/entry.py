"""The body of one job's Ray task: start the framework, train, judge, and return a result.

The result is a plain JSON-ready dict, so the driver records it as it is and a report
can be rebuilt from it later without Ray. The job's framework comes from the registry
(workers/frameworks/), which imports it here, inside the task, so the driver never pays
for TensorFlow or torch.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers import frameworks, models
from workers.capture import captured_output
from workers.data import Dataset
from workers.devices import ray_gpu_ids, running_ray
from workers.distributed import SINGLE_WORKER, WorkerContext
from workers.reference import (
    classify_convergence,
    classify_fit,
    fits_noise,
    floor_gap,
    least_squares,
    mean_squared_error,
    r2_gap,
)
from workers.reporting import TrainingMonitor
from workers.training import Scaling, TrainingData, TrainingJob


def run_job(
    spec: TrainingJob,
    dataset: Dataset,
    submitted_at: float,
    context: WorkerContext = SINGLE_WORKER,
    *,
    monitor: TrainingMonitor | None = None,
) -> dict[str, Any]:
    """Train `spec` on `dataset` as worker `context` and return its result (without id and status).

    With a `monitor` and `spec.report_every`, a single-device job reports its loss every
    `report_every` epochs and ends early when the monitor says stop; its result then
    says `stopped` and every field of it comes from the epochs it trained.

    The job's stdout and stderr come back as `logs`; when the job raises, they ride on
    the exception as `runjobs_logs`, with the traceback at the end of stderr.
    """
    entered_at = time.time()

    def train() -> dict[str, Any]:
        print(
            f"runjobs: {spec.framework} {spec.variant} job, rank {context.rank} of {context.world_size}, "
            f"on {socket.gethostname()} (pid {os.getpid()})",
            flush=True,
        )
        result, trained = _train(spec, dataset, submitted_at, context, entered_at, monitor)
        print(f"runjobs: {result['convergence']}, final loss {result['loss']['final']:.6g}", flush=True)
        # --save-models: every rank learned the same parameters, so rank 0 exports.
        if spec.save_models and context.rank == 0:
            result["model_files"] = export_model_files(spec, dataset, trained)
        return result

    return with_captured_logs(train)


def with_captured_logs(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`body()`'s result with its stdout and stderr as `logs`; when it raises, they ride on the
    exception as `runjobs_logs`, with the traceback at the end of stderr (a job's, a pack's)."""
    with captured_output() as output:
        try:
            result = body()
        except BaseException as error:
            traceback.print_exc()
            failure = error
        else:
            failure = None
    if failure is not None:
        failure.runjobs_logs = output.as_dict()
        raise failure
    result["logs"] = output.as_dict()
    return result


# A record keeps every epoch's loss, seconds and (linear model) parameters up to this many
# epochs; a longer job keeps this many epochs spread evenly, always its first and last, and
# names them in `history_epochs` (1-based). 10,000 jobs of 500 epochs then stay a ledger
# and report of about a hundred megabytes. Convergence is judged on every epoch first.
MAX_HISTORY_EPOCHS = 100
# A record lists a model's parameter values up to this many; the saved model holds them all.
MAX_RECORDED_VALUES = 256
# A model beyond the line records its outputs on this many of the data's rows, for the report.
MAX_FITTED_ROWS = 500


@dataclass(frozen=True)
class TrainedModel:
    """What export needs from a trained job: its plan and parameters in the data's units."""

    plan: models.ModelPlan
    parameters: list[np.ndarray]
    names: list[str]
    units: str  # "original", or "standardised" for a user model trained on standardised data


def _train(
    spec,
    dataset: Dataset,
    submitted_at: float,
    context: WorkerContext,
    entered_at: float,
    monitor: TrainingMonitor | None,
) -> tuple[dict[str, Any], TrainedModel]:
    process_started_at = process_start_time()
    gpu_ids = ray_gpu_ids()

    startup_began = time.perf_counter()
    # The first job of a process imports the framework here: start-up, not set-up.
    framework = frameworks.get(spec.framework)
    device = framework.initialise(gpu_ids, spec.allow_cpu_fallback, spec, context)
    startup_in_task = time.perf_counter() - startup_began

    plan = models.plan(spec, dataset.feature_count)
    scaling = Scaling.standardise(dataset) if spec.normalize else Scaling.identity(dataset.feature_count)
    prediction_inputs = np.asarray(spec.predict, dtype=np.float64).reshape(-1, dataset.feature_count)
    # Only a single-device job reports: the replicas or ranks of a multi-device job would
    # each have to hear the same answer at the same epoch (one more collective), so those
    # train every epoch whatever the monitor would say.
    monitor = monitor if spec.variant == "single" else None
    outcome = framework.train(
        spec,
        plan,
        TrainingData.prepare(dataset, scaling, prediction_inputs, spec.dtype),
        device,
        context,
        monitor=monitor,
    )
    if outcome.stopped_at_epoch is not None:
        print(f"runjobs: stopped early after epoch {outcome.stopped_at_epoch} of {spec.epochs}", flush=True)

    queued_s, startup_s = start_times(process_started_at, submitted_at, entered_at, startup_in_task)
    return judged_result(
        spec,
        dataset,
        plan,
        scaling,
        prediction_inputs,
        outcome,
        framework,
        device,
        context,
        queued_s,
        startup_s,
    )


def _least_squares(dataset: Dataset):
    """The data's exact optimum, solved once per dataset a process sees (a pack judges many jobs on it)."""
    cached = _REFERENCES.get(id(dataset))
    if cached is None or cached[0] is not dataset:
        cached = _REFERENCES[id(dataset)] = (dataset, least_squares(dataset))
        while len(_REFERENCES) > 4:
            _REFERENCES.pop(next(iter(_REFERENCES)))
    return cached[1]


_REFERENCES: dict[int, tuple[Dataset, object]] = {}


def start_times(
    process_started_at: float, submitted_at: float, entered_at: float, startup_in_task: float
) -> tuple[float, float]:
    """(queued_s, startup_s) of work that entered its task at `entered_at`.

    Ray prestarts idle workers, so a task usually lands in a process that already
    existed when the job was submitted: then only the import and initialisation are
    start-up. A process started for this job adds its own start to start-up.
    """
    if process_started_at >= submitted_at:
        return process_started_at - submitted_at, (entered_at - process_started_at) + startup_in_task
    return entered_at - submitted_at, startup_in_task


def judged_result(
    spec,
    dataset: Dataset,
    plan: models.ModelPlan,
    scaling: Scaling,
    prediction_inputs: np.ndarray,
    outcome,
    framework,
    device,
    context: WorkerContext,
    queued_s: float,
    startup_s: float,
) -> tuple[dict[str, Any], TrainedModel]:
    """A trained job's result: its parameters in the data's units, judged against the data.

    Shared by a job alone and each member of a pack (workers/packed.py).
    """
    predictions = scaling.original_target(outcome.predictions)
    reference = _least_squares(dataset)
    names = [name for name, _ in plan.layout] if plan.user is None else list(outcome.parameter_names)
    fitted_sample = None
    if plan.is_linear:
        weights, bias = scaling.original_parameters(outcome.weights, outcome.bias)
        final_loss = mean_squared_error(dataset, weights, bias)
        convergence = classify_convergence(dataset, weights, bias, outcome.loss_history, reference)
        parameters = [weights.reshape(-1, 1), np.asarray([bias])]
        params: dict[str, Any] = {"weights": weights.tolist(), "bias": bias}
        kept = kept_epochs(len(outcome.loss_history), whole=spec.report_every is not None)
        weight_history, bias_history = scaling.original_parameter_history(outcome.parameter_history[kept])
        history = {"weights": weight_history.tolist(), "bias": bias_history.tolist()}
    else:
        fitted = scaling.original_target(outcome.fitted)
        with np.errstate(all="ignore"):
            final_loss = float(np.mean((fitted - dataset.target) ** 2))
        convergence = classify_fit(outcome.loss_history, final_loss, dataset)
        folded = plan.user is None and spec.normalize
        parameters = scaling.original_stack(outcome.parameters) if folded else outcome.parameters
        params = parameter_summary(names, parameters)
        params["units"] = "standardised" if spec.normalize and plan.user is not None else "original"
        history = {}
        kept = kept_epochs(len(outcome.loss_history), whole=spec.report_every is not None)
        # What the report draws against the data for a model beyond the line: its outputs
        # on up to MAX_FITTED_ROWS rows spread evenly over the data.
        rows = np.unique(np.linspace(0, dataset.rows - 1, min(dataset.rows, MAX_FITTED_ROWS)).astype(int))
        fitted_sample = {"rows": rows.tolist(), "outputs": fitted[rows].tolist()}
    gap_to_floor = floor_gap(dataset, final_loss)
    trained = TrainedModel(plan, parameters, names, params.get("units", "original"))

    result = {
        "rank": context.rank,
        "world_size": max(context.world_size, len(device.replica_names)),
        **outcome.distribution_fields(),
        "convergence": convergence,
        "model": {
            "name": plan.name,
            "parameters": int(sum(np.size(parameter) for parameter in parameters)),
            "dtype": spec.dtype,
            "init": "shared"
            if spec.shared_start
            else ("framework" if spec.initial_value is None else "value"),
            "update_rule": outcome.update_rule,
            **({"digest": plan.user.digest} if plan.user is not None else {}),
        },
        "params": params,
        # Told to stop early: the epochs trained of those asked for. Every other field is
        # computed from the epochs trained.
        **(
            {"stopped": {"epochs": outcome.stopped_at_epoch, "of": spec.epochs}}
            if outcome.stopped_at_epoch is not None
            else {}
        ),
        # The best straight line: the exact optimum of the linear model, a yardstick for others.
        "reference": {"weights": reference.weights.tolist(), "bias": reference.bias, "loss": reference.loss},
        "loss": {
            "final": final_loss,
            "r2_gap": r2_gap(dataset, final_loss, reference) if plan.is_linear else None,
            "floor": dataset.noise_floor,
            "floor_gap": gap_to_floor,
            "fits_noise": fits_noise(gap_to_floor),
            "history_units": "standardised" if spec.normalize else "original",
            "history": np.asarray(outcome.loss_history, dtype=np.float64)[kept].tolist(),
        },
        # Per epoch, in the data's units: what TensorBoard and the HTML report plot.
        # Seconds to 4 significant digits: a clock's noise needs no more, and a sweep's records half the size.
        "history": {
            "epoch_s": [float(f"{value:.4g}") for value in np.asarray(outcome.epoch_seconds)[kept]],
            **history,
        },
        # Past MAX_HISTORY_EPOCHS epochs the per-epoch series above hold only these epochs.
        **({"history_epochs": (kept + 1).tolist()} if len(kept) < len(outcome.loss_history) else {}),
        "predictions": [
            {"input": point.tolist(), "output": float(output)}
            for point, output in zip(prediction_inputs, predictions)
        ],
        **({"fitted": fitted_sample} if fitted_sample is not None else {}),
        "timings": {
            "queued_s": max(queued_s, 0.0),
            "startup_s": startup_s,
            "setup_s": outcome.setup_s,
            "train_s": outcome.train_s,
            "epoch_s_median": statistics.median(outcome.epoch_seconds) if outcome.epoch_seconds else None,
            "predict_s": outcome.predict_s,
        },
        "placement": {
            "node_id": _ray_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": device.name,
            "devices": list(outcome.distribution.get("devices", [device.name])),
            "gpu_ids": list(device.gpu_ids),
            "cpu_fallback": device.cpu_fallback,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
        "versions": {
            "python": platform.python_version(),
            "ray": _ray_version(),
            spec.framework: framework.version,
            "numpy": np.__version__,
        },
        "data": {
            "source": dataset.source,
            "rows": dataset.rows,
            "features": list(dataset.feature_names),
            "target": dataset.target_name,
        },
    }
    return result, trained


def kept_epochs(epochs: int, whole: bool = False) -> np.ndarray:
    """The 0-based epochs a record keeps of `epochs`: all of them, or MAX_HISTORY_EPOCHS spread evenly.

    `whole`: a job under a stopping rule keeps every epoch, as the rule compares the jobs'
    losses epoch by epoch (jobs/run/stopping.py).
    """
    if whole or epochs <= MAX_HISTORY_EPOCHS:
        return np.arange(epochs)
    return np.unique(np.round(np.linspace(0, epochs - 1, MAX_HISTORY_EPOCHS)).astype(int))


def parameter_summary(names: list[str], parameters: list[np.ndarray]) -> dict[str, Any]:
    """Each parameter's name, shape and norm, the count, and the values when they are few."""
    count = int(sum(np.size(parameter) for parameter in parameters))
    with np.errstate(all="ignore"):
        layers = [
            {
                "name": name,
                "shape": list(np.shape(parameter)),
                "norm": float(np.linalg.norm(np.asarray(parameter, dtype=np.float64).reshape(-1))),
            }
            for name, parameter in zip(names, parameters)
        ]
    if count <= MAX_RECORDED_VALUES:
        for layer, parameter in zip(layers, parameters):
            layer["values"] = np.asarray(parameter, dtype=np.float64).tolist()
    return {"layers": layers, "count": count}


def process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):
        return float("-inf")


def _ray_node_id() -> str | None:
    ray = running_ray()
    return ray.get_runtime_context().get_node_id() if ray is not None else None


def _ray_version() -> str | None:
    ray = running_ray()
    return ray.__version__ if ray is not None else None


def export_model_files(spec, dataset: Dataset, trained: TrainedModel) -> dict[str, bytes]:
    """The job's model in its framework's formats, as {relative path: bytes} (workers/export.py).

    Bytes, not a path: on a remote cluster this worker's disk is not the user's output
    directory; the driver writes them to DIR/models/JOB.
    """
    import tempfile
    from pathlib import Path

    from workers.export import export_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="runjobs-model-") as temporary:
        root = Path(temporary)
        formats = export_model(
            spec.framework,
            trained.plan,
            trained.parameters,
            root,
            feature_names=list(dataset.feature_names),
            units=trained.units,
        )
        files = {
            path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }
    size = sum(len(content) for content in files.values())
    print(
        f"runjobs: exported the model ({', '.join(formats)}; {size} bytes) "
        f"in {time.perf_counter() - started:.2f}s",
        flush=True,
    )
    return files
