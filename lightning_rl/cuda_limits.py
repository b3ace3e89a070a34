"""The CUDA context's per-thread stack limit, read through the driver API (a memory diagnostic).

The driver reserves local memory for every thread the device can hold at once (the stack limit times the
resident threads: 264 MiB at the default 1 KiB on an H200), outside PyTorch's allocator, and grows it for a kernel
that needs more. Lowering the limit frees that memory but broke CUDA graphs on an H200 (bench/results/vs_trl_NOTES.md,
nineteenth visit), so the library only reads it.
"""

from __future__ import annotations

import ctypes
import functools

#: ``CU_LIMIT_STACK_SIZE`` in ``cuda.h``.
_CU_LIMIT_STACK_SIZE = 0


@functools.cache
def cuda_driver() -> ctypes.CDLL | None:
    """The CUDA driver library (``libcuda``), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def stack_limit() -> int | None:
    """The current CUDA context's per-thread stack limit in bytes; None without a CUDA driver or context."""
    lib = cuda_driver()
    if lib is None:
        return None
    value = ctypes.c_size_t()
    if lib.cuCtxGetLimit(ctypes.byref(value), _CU_LIMIT_STACK_SIZE) != 0:
        return None
    return int(value.value)


__all__ = ["cuda_driver", "stack_limit"]
