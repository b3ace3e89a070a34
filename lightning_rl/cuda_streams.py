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
import functools

import torch

_CU_STREAM_NON_BLOCKING = 1
_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}


@functools.cache
def _driver() -> ctypes.CDLL | None:
    if torch.version.hip is not None:
        return None
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _driver_stream(index: int) -> torch.cuda.Stream | None:
    """A new non-blocking stream of device ``index`` from the driver, or None when the driver call failed."""
    driver = _driver()
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
        return torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", index))


def side_stream(device: torch.device | int | str, name: str = "copies") -> torch.cuda.Stream:
    """The process's side stream ``name`` of a CUDA ``device``, made on first use and kept for the process's life.

    Args:
        device: the CUDA device the stream runs on.
        name: which of the library's side streams (callers that must not share one pass different names).

    Returns:
        A non-blocking stream (work on it overlaps the default stream's), the same object on every call.
    """
    index = torch.device(device).index if not isinstance(device, int) else device
    if index is None:
        index = torch.cuda.current_device()
    key = (index, name)
    if key not in _STREAMS:
        _STREAMS[key] = _driver_stream(index) or torch.cuda.Stream(index)
    return _STREAMS[key]
