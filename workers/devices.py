"""The device a job trains on, taken from Ray's GPU assignment.

Ray sets CUDA_VISIBLE_DEVICES for a task that asked for GPUs, so inside the task the
assigned GPUs are numbered from 0. When Ray assigned a GPU but the framework sees no
CUDA device (a CPU build, a driver problem, or a node that declared GPUs it lacks),
the job fails unless the spec allows a CPU fallback; the result always records which
device was really used.
"""

from __future__ import annotations

import os
import sys

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
