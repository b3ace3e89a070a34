"""Offloaded checkpoints: each checkpointed decoder layer's input waits in pinned host memory until its recompute.

With activation checkpointing a layer keeps only its inputs for the backward, which recomputes the rest. Moving
the residual-stream input of every layer to host memory in the forward, and back in the backward, leaves the
device about two layers' inputs instead of every layer's.

The hooks open around the layer's call (module hooks), outside its ``forward``, so a compiled layer
(:mod:`lightning_rl.compiled_layers`) stays one graph. transformers' own ``offload`` opens
``torch.autograd.graph.save_on_cpu`` inside the layer's ``forward``, which dynamo cannot trace: the compiled
layer then fell back to eager code (``torch.utils.checkpoint`` disables dynamo for what it runs).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

_HANDLES = "_lightning_rl_offload_handles"
_STATE = threading.local()  # .open: this thread's layer calls in flight, each with its hooks (None where inactive)


class _InputToHost(torch.autograd.graph.save_on_cpu):
    """Saved-tensor hooks that move what shares ``hidden_states``' storage (and is contiguous) to host memory and keep
    the rest.

    Weights, rotary tables and masks a layer saves stay where they are: the weights live on anyway, and the
    rotary tables are one tensor shared by every layer.
    """

    def __init__(self, hidden_states: torch.Tensor) -> None:
        on_device = hidden_states.device.type != "cpu"
        super().__init__(pin_memory=on_device and torch.cuda.is_available(), device_type=hidden_states.device.type)
        storage = hidden_states.untyped_storage().data_ptr()
        to_host, back = self.pack_hook, self.unpack_hook

        def pack(tensor: torch.Tensor) -> tuple[bool, Any]:
            # contiguous only: the copy comes back contiguous, and compiled code checks its saved tensors' strides
            if tensor.untyped_storage().data_ptr() == storage and tensor.is_contiguous():
                return True, to_host(tensor)
            return False, tensor

        def unpack(packed: tuple[bool, Any]) -> torch.Tensor:
            moved, value = packed
            return back(value) if moved else value

        self.pack_hook, self.unpack_hook = pack, unpack


def open_calls() -> list[tuple[nn.Module, Any]]:
    """The offloading layer calls in flight in the calling thread: (layer, its hooks or None), innermost last."""
    if not hasattr(_STATE, "open"):
        _STATE.open = []
    return _STATE.open


def _open(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    hooks = None
    if layer.training and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor):
        hooks = _InputToHost(hidden)
        hooks.__enter__()
    open_calls().append((layer, hooks))


def _close(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    calls = open_calls()
    if calls and calls[-1][0] is layer:  # always_call pairs it with its pre-hook, also when the forward raised
        _, hooks = calls.pop()
        if hooks is not None:
            hooks.__exit__(None, None, None)


def offload_layer_inputs(layer: nn.Module) -> None:
    """Send ``layer``'s input to pinned host memory while a training forward keeps it for the backward (idempotent).

    Args:
        layer: a decoder layer whose first argument (or ``hidden_states``) is the residual stream.
    """
    if offloads_layer_inputs(layer):
        return
    handles = (layer.register_forward_pre_hook(_open, with_kwargs=True),
               layer.register_forward_hook(_close, with_kwargs=True, always_call=True))
    setattr(layer, _HANDLES, handles)


def keep_layer_inputs(layer: nn.Module) -> None:
    """Undo :func:`offload_layer_inputs`: ``layer``'s input stays on the device again."""
    for handle in getattr(layer, _HANDLES, ()):
        handle.remove()
    if hasattr(layer, _HANDLES):
        delattr(layer, _HANDLES)


def offloads_layer_inputs(layer: nn.Module) -> bool:
    """Whether :func:`offload_layer_inputs` is on for ``layer``."""
    return hasattr(layer, _HANDLES)


__all__ = ["keep_layer_inputs", "offload_layer_inputs", "offloads_layer_inputs", "open_calls"]
