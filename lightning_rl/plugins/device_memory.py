"""Device memory figures: PyTorch's own (allocated, reserved, peak) and the driver's count for the whole device."""

from __future__ import annotations

import torch


def memory_figures(device: torch.device | str | None = None) -> dict[str, int]:
    """Allocated, reserved and peak device memory in bytes (empty off CUDA)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return {}
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "peak": torch.cuda.max_memory_allocated(device)}


def device_used_bytes(device: torch.device | str | None = None) -> int | None:
    """Device memory in use by every process, as the driver counts it, after emptying PyTorch's cache (None off CUDA).

    Unlike :func:`memory_figures` this sees what PyTorch's allocator does not: CUDA contexts, libraries, and
    other processes, such as a rollout engine's own.
    """
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    torch.cuda.empty_cache()  # blocks PyTorch holds but no tensor uses (a LoRA base handed to the engine) are free
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


__all__ = ["device_used_bytes", "memory_figures"]
