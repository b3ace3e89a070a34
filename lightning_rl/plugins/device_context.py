"""The device memory a process holds outside PyTorch's allocator: the CUDA context and the libraries' modules.

PyTorch's figures (``memory_reserved``) leave it out, NVML and ``nvidia-smi`` count it. The memory plan counts it
so that a ``memory_budget`` is the process's whole figure.
"""

from __future__ import annotations

import contextlib
import os

import torch

#: Used when NVML cannot say: this process's figure less PyTorch's reserved memory before the rollout engine
#: started, 0.596 GiB on an H200 with torch 2.11 and CUDA 13 (``bench/results/vs_trl_NOTES.md``, eleventh visit).
DEFAULT_CONTEXT_BYTES = 600 * 1024**2


def memory_outside_torch(device: torch.device) -> int | None:
    """NVML's figure for this process on ``device`` less PyTorch's reserved memory there, in bytes.

    Returns:
        None when NVML (``nvidia-ml-py``) is missing, cannot find the device, or does not list this process
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
                   if p.pid == os.getpid())
    except (pynvml.NVMLError, AttributeError, RuntimeError):
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not used:
        return None
    return max(0, used - torch.cuda.memory_reserved(device))


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


__all__ = ["DEFAULT_CONTEXT_BYTES", "context_bytes_for", "memory_outside_torch"]
