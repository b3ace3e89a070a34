"""The CUDA context's per-thread stack limit, read and set through the driver API.

The driver reserves local memory for every thread the device can hold at once (the stack limit times the
resident threads: about 270k on an H200), and keeps a reservation grown for a kernel that needed a larger
stack after that kernel ends. That memory is outside PyTorch's allocator and counts in the process's NVML
figure. Setting the limit again gives the excess back; a later kernel that needs more grows it again.
"""

from __future__ import annotations

import ctypes
import functools

#: ``CU_LIMIT_STACK_SIZE`` in ``cuda.h``.
_CU_LIMIT_STACK_SIZE = 0


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def stack_limit() -> int | None:
    """The current CUDA context's per-thread stack limit in bytes; None without a CUDA driver or context."""
    lib = _driver()
    if lib is None:
        return None
    value = ctypes.c_size_t()
    if lib.cuCtxGetLimit(ctypes.byref(value), _CU_LIMIT_STACK_SIZE) != 0:
        return None
    return int(value.value)


def set_stack_limit(nbytes: int) -> bool:
    """Set the current CUDA context's per-thread stack limit (the driver resizes its local-memory reservation).

    Returns:
        Whether the driver accepted it (False without a CUDA driver or context).
    """
    if nbytes < 0:
        raise ValueError(f"a stack limit is a byte count >= 0, got {nbytes}")
    lib = _driver()
    if lib is None:
        return False
    return lib.cuCtxSetLimit(_CU_LIMIT_STACK_SIZE, ctypes.c_size_t(nbytes)) == 0


__all__ = ["set_stack_limit", "stack_limit"]
