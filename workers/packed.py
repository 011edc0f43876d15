"""The body of a pack's task: train many jobs as one vectorised program, and judge each as its own job.

A pack (jobs/plan/packing.py) reaches a warm worker as a `TrainingPack`: its jobs share
everything but their vectorised settings. The framework's `train_pack` trains them
together; each member is then judged exactly as a job alone is (workers/entry.py,
judged_result), so its result has the same fields. Its seconds are its share of the
pack's (the pack's divided by its size, so a sweep's seconds still add up), and
`timings.pack` holds the pack's own: its id, size, whether it was vectorised, and its
start-up, set-up, train and predict seconds.

A framework that cannot vectorise the pack's model (PackingUnsupported), or whose
vectorised program fails as a whole (out of memory), trains the members one after
another in the same task; their records say why. One member whose
judging fails is recorded failed with its error; the others are not held back.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers import frameworks, models
from workers.data import Dataset
from workers.devices import ray_gpu_ids
from workers.distributed import SINGLE_WORKER
from workers.entry import (
    export_model_files,
    judged_result,
    process_start_time,
    start_times,
    with_captured_logs,
)
from workers.frameworks.base import PackingUnsupported
from workers.training import Scaling, TrainerOutcome, TrainingData, TrainingJob


@dataclass(frozen=True)
class TrainingPack:
    """What a worker needs to train a pack: its id and its members' jobs, in order."""

    id: str
    jobs: tuple[TrainingJob, ...]

    @property
    def framework(self) -> str:
        return self.jobs[0].framework


def run_pack(pack: TrainingPack, dataset: Dataset, submitted_at: float) -> dict[str, Any]:
    """Train `pack` on `dataset`; its result holds every member's outcome under `members`, in order.

    Each member is {"status": "succeeded", "result": {...}} or {"status": "failed",
    "error": "..."}. The pack's own `timings` and `placement` sit beside them (what the
    warm pool learns from), and its output comes back as `logs`; when the pack as a whole
    raises, they ride on the exception as `runjobs_logs`, as a job's do.
    """
    entered_at = time.time()

    def train() -> dict[str, Any]:
        print(
            f"runjobs: {pack.id}, {len(pack.jobs)} {pack.framework} jobs trained together, "
            f"on {socket.gethostname()} (pid {os.getpid()})",
            flush=True,
        )
        result = _train_pack(pack, dataset, submitted_at, entered_at)
        print(f"runjobs: {pack.id} {result['pack']['how']}", flush=True)
        return result

    return with_captured_logs(train)


def _train_pack(
    pack: TrainingPack, dataset: Dataset, submitted_at: float, entered_at: float
) -> dict[str, Any]:
    process_started_at = process_start_time()
    first = pack.jobs[0]
    startup_began = time.perf_counter()
    framework = frameworks.get(first.framework)
    device = framework.initialise(ray_gpu_ids(), first.allow_cpu_fallback, first)
    startup_in_task = time.perf_counter() - startup_began
    queued_s, startup_s = start_times(process_started_at, submitted_at, entered_at, startup_in_task)

    plan = models.plan(first, dataset.feature_count)
    scaling = Scaling.standardise(dataset) if first.normalize else Scaling.identity(dataset.feature_count)
    prediction_inputs = np.asarray(first.predict, dtype=np.float64).reshape(-1, dataset.feature_count)
    data = TrainingData.prepare(dataset, scaling, prediction_inputs, first.dtype)
    size = len(pack.jobs)
    try:
        outcomes: list[TrainerOutcome | BaseException] = list(
            framework.train_pack(pack.jobs, plan, data, device)
        )
        how = {"vectorised": True, "how": "trained as one vectorised program"}
        seconds = {key: getattr(outcomes[0], key) for key in ("setup_s", "train_s", "predict_s")}
    except Exception as error:
        # A model the framework cannot vectorise, or a program that failed as a whole (out
        # of memory on its device): each job trains alone, and fails alone if it fails.
        if not isinstance(error, PackingUnsupported):
            traceback.print_exc()
        why = error if isinstance(error, PackingUnsupported) else f"the vectorised program failed: {error}"
        print(f"runjobs: {why}; its jobs train one after another", flush=True)
        how = {"vectorised": False, "why": str(why), "how": f"trained one job after another ({why})"}
        outcomes = [_train_alone(framework, job, plan, data, device) for job in pack.jobs]
        trained = [outcome for outcome in outcomes if isinstance(outcome, TrainerOutcome)]
        seconds = {
            key: sum(getattr(outcome, key) for outcome in trained)
            for key in ("setup_s", "train_s", "predict_s")
        }
    pack_fields = {"id": pack.id, "size": size, **how, "startup_s": startup_s, **seconds}

    members = []
    for job, outcome in zip(pack.jobs, outcomes):
        if isinstance(outcome, BaseException):
            members.append({"status": "failed", "error": f"{type(outcome).__name__}: {outcome}"})
            continue
        try:
            shared = _shared(outcome, size) if how["vectorised"] else outcome
            result, trained = judged_result(
                job,
                dataset,
                plan,
                scaling,
                prediction_inputs,
                shared,
                framework,
                device,
                SINGLE_WORKER,
                queued_s,
                startup_s / size,
            )
            if job.save_models:  # --save-models: each member's model, as a job alone exports it
                result["model_files"] = export_model_files(job, dataset, trained)
        except Exception as error:  # one member's judging failed: the others are still recorded
            traceback.print_exc()
            members.append({"status": "failed", "error": f"{type(error).__name__}: {error}"})
            continue
        result["timings"]["pack"] = {key: pack_fields[key] for key in ("id", "size", "vectorised", "train_s")}
        result["timings"]["pack"]["share"] = 1.0 / size
        members.append({"status": "succeeded", "result": result})
    return {
        "pack": pack_fields,
        "members": members,
        "timings": {"queued_s": max(queued_s, 0.0), "startup_s": startup_s, **seconds},
        "placement": {"device": device.name, "pid": os.getpid(), "hostname": socket.gethostname()},
    }


def _train_alone(framework, job: TrainingJob, plan, data, device) -> TrainerOutcome | BaseException:
    try:
        return framework.train(job, plan, data, device)
    except Exception as error:
        traceback.print_exc()
        return error


def _shared(outcome: TrainerOutcome, size: int) -> TrainerOutcome:
    """A member's outcome with the pack's seconds divided: its share of the pack's work."""
    return dataclasses.replace(
        outcome,
        setup_s=outcome.setup_s / size,
        train_s=outcome.train_s / size,
        predict_s=outcome.predict_s / size,
        epoch_seconds=[seconds / size for seconds in outcome.epoch_seconds],
    )
