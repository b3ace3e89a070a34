"""The device memory of this process as NVML counts it: outside PyTorch's allocator, and with its descendants.

PyTorch's figures (``memory_reserved``) leave out the CUDA context and the libraries' modules; NVML and
``nvidia-smi`` count them. The memory plan counts them so that a ``memory_budget`` is the process's whole figure.
The rollout callback measures its engine's start in this process and its descendants only, so that other jobs on
the same GPU do not move the figure.
"""

from __future__ import annotations

import contextlib
import os

import psutil
import torch

#: Used when NVML cannot say: this process's figure less PyTorch's reserved memory before the rollout engine
#: started, 0.596 GiB on an H200 with torch 2.11 and CUDA 13 (``bench/results/vs_trl_NOTES.md``, eleventh visit).
DEFAULT_CONTEXT_BYTES = 600 * 1024**2


def nvml_used_by(device: torch.device, pids: set[int]) -> int | None:
    """NVML's figure for the processes ``pids`` on ``device``, in bytes.

    Returns:
        None when NVML (``nvidia-ml-py``) is missing, cannot find the device, or lists none of ``pids`` there
        (a container with its own PID namespace).
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        uuid = torch.cuda.get_device_properties(device).uuid
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        used = sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                   if p.pid in pids)
    except (pynvml.NVMLError, AttributeError, RuntimeError):
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return used or None


def process_tree_pids() -> set[int]:
    """The PIDs of this process and its descendants (an engine in a process of its own, and its workers)."""
    me = psutil.Process()
    try:
        return {me.pid, *(child.pid for child in me.children(recursive=True))}
    except psutil.Error:
        return {me.pid}


def memory_outside_torch(device: torch.device) -> int | None:
    """NVML's figure for this process on ``device`` less PyTorch's reserved memory there, in bytes.

    Returns:
        None when NVML cannot say (:func:`nvml_used_by`).
    """
    used = nvml_used_by(device, {os.getpid()})
    if used is None:
        return None
    return max(0, used - torch.cuda.memory_reserved(device))


def process_tree_used_bytes(device: torch.device) -> int | None:
    """Device memory this process and its descendants hold on ``device``, as NVML counts it.

    Unlike the device-wide figure, other jobs on the same GPU do not move it. PyTorch's cache is emptied first,
    so that blocks no tensor uses do not count. None when NVML cannot say (:func:`nvml_used_by`).
    """
    torch.cuda.empty_cache()
    return nvml_used_by(device, process_tree_pids())


def context_bytes_for(device: torch.device, setting: int | None) -> int:
    """What the memory plan counts outside PyTorch.

    ``setting`` when given, else the measured figure (:func:`memory_outside_torch`), else
    :data:`DEFAULT_CONTEXT_BYTES`; 0 off CUDA.
    """
    if setting is not None:
        return int(setting)
    if device.type != "cuda":
        return 0
    measured = memory_outside_torch(device)
    return DEFAULT_CONTEXT_BYTES if measured is None else measured


__all__ = [
    "DEFAULT_CONTEXT_BYTES",
    "context_bytes_for",
    "memory_outside_torch",
    "nvml_used_by",
    "process_tree_pids",
    "process_tree_used_bytes",
]
