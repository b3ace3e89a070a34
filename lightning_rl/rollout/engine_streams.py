"""vLLM's CUDA streams, in an engine process the library launched, made by the driver instead of PyTorch's pool.

vLLM makes its streams with ``torch.cuda.Stream()``: the stream it runs the model on (``current_stream``), the one
it captures CUDA graphs on, the asynchronous output copies'. The first such call fills PyTorch's pool of 32 streams
per priority level, 70 MiB of device memory outside PyTorch's allocator on an H200 (:mod:`lightning_rl.cuda_streams`),
for the three or four streams vLLM uses. In an engine process that :class:`~lightning_rl.rollout.vllm_process.
VLLMProcessEngine` started, :func:`install_driver_streams` replaces ``torch.cuda.Stream`` with a subclass whose
plain calls (no stream id, default priority) make a non-blocking driver stream, as the pool's streams are
non-blocking; every other call (the current stream's wrapper, another priority) is PyTorch's own.

The launcher names itself in :data:`ENGINE_STREAMS_ENV` while vLLM spawns the engine core; the worker module vLLM
imports there (:mod:`~lightning_rl.rollout.vllm_worker`) calls :func:`install_in_launched_engine` before vLLM builds
its worker. The launcher's own process is never changed.
"""

from __future__ import annotations

import os

import torch

from lightning_rl.cuda_streams import device_index, driver_stream_pointer

#: Set (to the launcher's process id) in the environment an engine process inherits.
ENGINE_STREAMS_ENV = "LIGHTNING_RL_ENGINE_STREAMS_LAUNCHER"
_MARK = "_lightning_rl_driver_streams"
_COUNTS = {"driver": 0, "pool": 0}


def install_driver_streams() -> None:
    """Make ``torch.cuda.Stream()`` give driver streams in this process (idempotent)."""
    original = torch.cuda.Stream
    if getattr(original, _MARK, False):
        return

    class DriverStream(original):  # type: ignore[misc,valid-type]
        """``torch.cuda.Stream`` whose new streams come from the driver, not from PyTorch's pool."""

        def __new__(cls, device: torch.device | int | str | None = None, priority: int = 0, **kwargs: object):
            if kwargs or priority != 0:  # a wrapper of an existing stream, or a priority the pool serves
                return original.__new__(cls, device, priority, **kwargs)
            index = device_index(device)
            pointer = driver_stream_pointer(index)
            if pointer is None:
                _COUNTS["pool"] += 1
                return original.__new__(cls, index, priority)
            _COUNTS["driver"] += 1
            with torch.cuda.device(index):
                return original.__new__(cls, stream_ptr=pointer)

    setattr(DriverStream, _MARK, True)
    torch.cuda.Stream = DriverStream  # type: ignore[misc]


def install_in_launched_engine() -> bool:
    """Install :func:`install_driver_streams` when this process is an engine the library launched. Returns whether."""
    launcher = os.environ.get(ENGINE_STREAMS_ENV)
    if not launcher or launcher == str(os.getpid()):
        return False
    install_driver_streams()
    return True


def launcher_environment() -> dict[str, str]:
    """The environment to spawn an engine process in, so that it makes its streams with the driver."""
    return {ENGINE_STREAMS_ENV: str(os.getpid())}


def streams_made() -> dict[str, int]:
    """How many new streams this process made from the driver and, where the driver failed, from the pool."""
    return dict(_COUNTS)


__all__ = [
    "ENGINE_STREAMS_ENV",
    "install_driver_streams",
    "install_in_launched_engine",
    "launcher_environment",
    "streams_made",
]
