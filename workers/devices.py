"""The device a job trains on, taken from Ray's GPU assignment.

Ray sets CUDA_VISIBLE_DEVICES for a task that asked for GPUs, so inside the task the
assigned GPUs are numbered from 0. When Ray assigned a GPU but the framework sees no
CUDA device (a CPU build, a driver problem, or a node that declared GPUs it lacks),
the job fails unless the spec allows a CPU fallback; the result always records which
device was really used.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from functools import cache
from typing import Any

from workers.training import Device


class DeviceUnavailableError(RuntimeError):
    """Ray assigned a GPU that this worker's framework cannot use."""


def running_ray():
    """Ray, when this process runs inside it (a Ray worker or driver); None otherwise.

    Never imports Ray: a job run in this process without Ray (the in-process executor)
    must not need it.
    """
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def ray_gpu_ids() -> tuple[str, ...]:
    """The GPU ids Ray assigned to the current task, or () outside a Ray task."""
    ray = running_ray()
    if ray is None:
        return ()
    return tuple(str(gpu_id) for gpu_id in ray.get_gpu_ids())


def choose_device(
    framework: str,
    gpu_ids: tuple[str, ...],
    visible_cuda_devices: int,
    gpu_device_name: str,
    allow_cpu_fallback: bool,
    why_unusable: str,
) -> Device:
    """The framework's device for this assignment, or DeviceUnavailableError."""
    if not gpu_ids:
        return Device("cpu")
    if visible_cuda_devices > 0:
        return Device(gpu_device_name, gpu_ids)
    if allow_cpu_fallback:
        return Device("cpu", gpu_ids, cpu_fallback=True)
    raise DeviceUnavailableError(
        f"Ray assigned GPU {','.join(gpu_ids)} but {framework} sees no CUDA device in this worker "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}; {why_unusable}); "
        "install a CUDA build on the node, or pass --allow-cpu-fallback to train on the CPU"
    )


def _on_gpu() -> bool:
    """Whether this process was given a GPU by Ray (a warm GPU worker holds it for its life)."""
    return bool(ray_gpu_ids())


def release_device(framework: str) -> dict[str, Any]:
    """After a warm worker's job: give back the device memory the framework allows, and check the device.

    torch returns its cached blocks (`empty_cache`); JAX and TensorFlow free what the job's
    arrays held once they are collected, but TensorFlow's allocator keeps the memory it
    grew to (tensorflow#36465), which is why the pool bounds a worker's device memory
    (jobs/run/warm_workers.py). A device left in a bad state (an asynchronous CUDA error
    surfaces at the next synchronisation) is reported, and the pool replaces the worker.
    """
    if not _on_gpu():
        return {"device_ok": True}  # the CPU's memory is the process's: nothing to hand back
    gc.collect()
    try:
        if framework == "torch":
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        elif framework == "jax":
            jax = sys.modules.get("jax")
            if jax is not None:
                for device in jax.devices():
                    if device.platform == "gpu":
                        jax.device_put(0.0, device).block_until_ready()
    except Exception as error:  # the device itself failed: the worker must not take another job
        return {"device_ok": False, "device_error": f"{type(error).__name__}: {error}"}
    return {"device_ok": True}


def device_memory(framework: str) -> dict[str, int | None] | None:
    """The device memory this worker's framework holds on its GPU, and the device's total; None on the CPU.

    From the framework's own allocator, what it holds rather than what live arrays use:
    torch's reserved bytes; TensorFlow's peak, since its allocator grows to its peak and
    never shrinks; JAX's pool (or reserved) bytes. The total comes from the framework
    where it tells (torch, JAX), else from nvidia-smi; None when neither does.
    """
    if not _on_gpu():
        return None
    in_use = total = None
    try:
        if framework == "torch":
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                in_use = int(torch.cuda.memory_reserved(0))
                total = int(torch.cuda.get_device_properties(0).total_memory)
        elif framework == "tensorflow":
            tf = sys.modules.get("tensorflow")
            if tf is not None and tf.config.list_logical_devices("GPU"):
                in_use = int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
                total = _total_from_nvidia_smi()
        elif framework == "jax":
            jax = sys.modules.get("jax")
            gpus = [device for device in jax.devices() if device.platform == "gpu"] if jax else []
            if gpus:
                stats = gpus[0].memory_stats() or {}
                in_use = stats.get("pool_bytes") or stats.get("bytes_reserved") or stats.get("bytes_in_use")
                total = stats.get("bytes_limit") or _total_from_nvidia_smi()
    except Exception:  # no answer from the framework: nothing to judge the worker by
        return None
    if in_use is None:
        return None
    return {"in_use": in_use, "total": total}


@cache
def _total_from_nvidia_smi() -> int | None:
    """The memory in bytes of the GPU Ray assigned (nvidia-smi ignores CUDA_VISIBLE_DEVICES, so
    it is asked for that GPU by its id), or None."""
    try:
        answer = subprocess.run(
            ["nvidia-smi", "-i", ray_gpu_ids()[0], "--query-gpu=memory.total",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return int(float(answer.stdout.splitlines()[0])) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
