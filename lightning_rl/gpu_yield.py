"""The update gives the GPU back to an engine process between decoder layers while that engine generates.

Two processes' kernels do not run at once on one GPU (without MPS): the device takes turns between their contexts
in time slices, and a context whose queue is never empty keeps its slice to the end. An update launched ahead of
its GPU keeps a queue, so each decode step of the engine process generating the next rollout beside it waits for
the update's slice. :class:`GPUYield` makes the update wait for its own kernels after every ``every``-th decoder
layer's forward and before its backward while ``active()`` says the engine generates: the queue empties there,
and the engine's pending step runs at once. The update pays the launches it no longer hides behind the GPU's work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_rl.compiled_layers import decoder_layers

log = logging.getLogger(__name__)


def _synchronize_stream() -> None:
    torch.cuda.current_stream().synchronize()


class GPUYield:
    """Hooks on a model's decoder layers that wait for the current CUDA stream while ``active()``: after the layer's
    forward (a forward hook; transformers up to 5.22 also calls it for the recompute) and before its backward (a hook
    on the gradient of its output).

    Args:
        model: the policy (its ``GradientCheckpointingLayer`` or ``*DecoderLayer`` modules get the hooks).
        active: whether to wait now (the engine generates).
        every: wait after every ``every``-th layer.
        synchronize: the wait (default: the current CUDA stream's ``synchronize``; tests pass a counter).

    Raises:
        ValueError: ``every`` < 1, or the model has no decoder layers.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool], every: int = 1,
                 synchronize: Callable[[], None] = _synchronize_stream) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no decoder layers to yield the GPU after "
                             "(GradientCheckpointingLayer or *DecoderLayer modules): use VLLMRollout(yield_gpu=False)")
        self.active, self.synchronize, self.waits = active, synchronize, 0
        self.handles: list[RemovableHandle] = [layer.register_forward_hook(self._hook)
                                               for i, layer in enumerate(layers) if i % every == every - 1]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._wait()
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._wait_in_backward)  # the layer's backward (with its recompute) comes next

    def _wait_in_backward(self, grad: torch.Tensor) -> None:
        self._wait()

    def _wait(self) -> None:
        if self.active():
            self.synchronize()
            self.waits += 1

    def take_waits(self) -> int:
        """The waits since the last call."""
        waits, self.waits = self.waits, 0
        return waits

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def gpu_yield_for(model: nn.Module, active: Callable[[], bool], setting: bool | None) -> GPUYield | None:
    """:class:`GPUYield` on ``model`` for ``VLLMRollout(yield_gpu=setting)``, once its engine overlaps on CUDA.

    None yields where ``model`` has decoder layers and returns None (with a log line) where it has none; True
    raises there instead.
    """
    if setting is None and not decoder_layers(model):
        log.info("VLLMRollout: %s has no decoder layers, so the update does not yield the GPU to the engine",
                 type(model).__name__)
        return None
    return GPUYield(model, active)


__all__ = ["GPUYield", "gpu_yield_for"]
