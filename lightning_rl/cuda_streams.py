"""Side streams that cost no device memory of their own.

PyTorch's ``torch.cuda.Stream()`` takes a stream from a pool that it fills on first use: 32 streams for each
priority level of the device, all created at once. On an H200 (torch 2.11) that first call took 70 MiB of device
memory outside PyTorch's allocator (`bench/probe_stream_memory.py`), for the one or two copy streams the library
needs. :func:`side_stream` makes one non-blocking stream with the CUDA driver instead and hands it to PyTorch as an
external stream, so every stream API (``torch.cuda.stream``, ``wait_stream``, events, ``record_stream``) works on
it. Where the driver call is unavailable (ROCm, no ``libcuda``), it falls back to the pool.
"""

from __future__ import annotations

import ctypes

import torch

from lightning_rl.cuda_limits import cuda_driver

_CU_STREAM_NON_BLOCKING = 1
_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}


def driver_stream_pointer(index: int) -> int | None:
    """A new non-blocking stream of CUDA device ``index`` made by the driver (its handle), or None when it failed.

    The stream lives as long as the process (as the pool's streams do).
    """
    driver = cuda_driver() if torch.version.hip is None else None
    if driver is None:
        return None
    with torch.cuda.device(index):
        torch.cuda.synchronize(index)  # creates the device's primary context (PyTorch's) if nothing did yet
        context = ctypes.c_void_p()
        if driver.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
            return None
        handle = ctypes.c_void_p()
        if driver.cuStreamCreate(ctypes.byref(handle), _CU_STREAM_NON_BLOCKING) != 0 or not handle.value:
            return None
        return int(handle.value)


def device_index(device: torch.device | int | str | None) -> int:
    """The CUDA device index ``device`` names (the current device for None or an index-less name)."""
    index = device if isinstance(device, int) else None if device is None else torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def side_stream(device: torch.device | int | str, name: str = "copies") -> torch.cuda.Stream:
    """The process's side stream ``name`` of a CUDA ``device``, made on first use and kept for the process's life.

    Args:
        device: the CUDA device the stream runs on.
        name: which of the library's side streams (callers that must not share one pass different names).

    Returns:
        A non-blocking stream (work on it overlaps the default stream's), the same object on every call.
    """
    index = device_index(device)
    key = (index, name)
    if key not in _STREAMS:
        pointer = driver_stream_pointer(index)
        _STREAMS[key] = (torch.cuda.ExternalStream(pointer, device=torch.device("cuda", index)) if pointer is not None
                         else torch.cuda.Stream(index))
    return _STREAMS[key]


__all__ = ["device_index", "driver_stream_pointer", "side_stream"]
