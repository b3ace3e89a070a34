"""Offloaded checkpoints: each checkpointed decoder layer's input waits in pinned host memory until its recompute.

With activation checkpointing a layer keeps only its input for the backward, which recomputes the rest. Moving
the residual-stream input of every layer to host memory in the forward, and back in the backward, leaves the
device about two layers' inputs instead of every layer's.

The layer runs inside an autograd function of its own (the reentrant form of checkpointing): its forward runs the
layer without autograd and copies the input to pinned host memory on a side stream; its backward copies it back,
runs the layer again with autograd under the forward's autocast and random state, and backpropagates through that.
No saved-tensor hooks are involved, and a compiled layer (:mod:`lightning_rl.compiled_layers`) compiles only its
own math, in the forward (gradients off, :func:`in_checkpoint_forward`) and in the recompute: on an H200 (torch
2.11, inductor), saved-tensor hooks opened around a compiled, checkpointed layer made it keep every activation
instead of recomputing them (a test model's update peak went from 359 to 1839 MiB), and transformers' own
``offload`` (hooks inside the layer's ``forward``) ran compiled layers eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_rl.cuda_streams import side_stream

_FLAG = "_lightning_rl_offloads_inputs"
_REENTRANT = "_lightning_rl_reentrant_checkpoint"
_PLAIN_CHECKPOINT = "_lightning_rl_plain_checkpoint_func"
_FORWARDS = threading.local()  # .depth: how many offloaded checkpoints' forwards this thread is inside


def in_checkpoint_forward() -> bool:
    """Whether this thread runs the forward of an :func:`offloaded_checkpoint`: gradients are off there, and the
    layer is recomputed with them in the backward, so it is the update's forward all the same.
    """
    return getattr(_FORWARDS, "depth", 0) > 0


def to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``tensor`` to host memory (pinned, on a side stream, for a CUDA tensor); (copy, event)."""
    if tensor.device.type != "cuda":
        return tensor.detach().clone(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = side_stream(tensor.device, "offloaded checkpoints")
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)  # its memory is not reused before the copy has read it
    return host, stream.record_event()


def from_host(host: torch.Tensor, event: Any, device: torch.device) -> torch.Tensor:
    """The copy :func:`to_host` started, back on ``device`` (ordered after that copy)."""
    if device.type != "cuda":
        return host.to(device)
    torch.cuda.current_stream(device).wait_event(event)
    return host.to(device, non_blocking=True)


def autocast_arguments(device_type: str) -> dict[str, Any]:
    """The ambient autocast of ``device_type`` as ``torch.autocast`` arguments (a backward's recompute restores it)."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


@contextlib.contextmanager
def _replayed(rng: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """The random state the forward ran with, for the recompute only (the caller's state is restored after)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        yield


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


class _OffloadedLayer(torch.autograd.Function):
    """``run(hidden)`` without autograd, ``hidden`` in host memory (or kept, ``offload=False``); the backward
    recomputes and differentiates ``run``.

    ``anchor`` is an empty tensor that requires grad, so the backward runs (and the layer's parameters get their
    gradients) also when ``hidden`` does not require grad.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], Any], hidden: torch.Tensor, anchor: torch.Tensor,
                offload: bool) -> Any:
        ctx.run, ctx.device, ctx.hidden_grad = run, hidden.device, hidden.requires_grad
        kinds = [hidden.device.type] + (["cpu"] if hidden.device.type != "cpu" else [])
        ctx.autocast = [autocast_arguments(kind) for kind in kinds]
        cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.device.type == "cuda" else None
        ctx.rng = (torch.get_rng_state(), cuda_rng)
        ctx.offload, ctx.used = offload, False
        if offload:
            ctx.host = to_host(hidden)  # started first: on a GPU the copy runs beside the layer's own kernels
        else:
            ctx.save_for_backward(hidden)  # autograd checks that nothing changed it in place meanwhile
        _FORWARDS.depth = getattr(_FORWARDS, "depth", 0) + 1
        try:
            return run(hidden)
        finally:
            _FORWARDS.depth -= 1

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("a layer under lightning-rl's reentrant checkpoint was differentiated twice "
                               "(retain_graph=True, or torch.autograd.grad before backward): its recomputation runs "
                               "once; turn offload_checkpoints off (offload_checkpoints=False), and tile_mlps with "
                               "compiled layers, for a second pass")
        ctx.used = True
        if ctx.offload:
            hidden = from_host(*ctx.host, ctx.device)
            ctx.host = None
        else:
            hidden = ctx.saved_tensors[0].detach()
        hidden.requires_grad_(ctx.hidden_grad)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_replayed(ctx.rng, ctx.device))
            for state in ctx.autocast:
                stack.enter_context(torch.autocast(**state))
            out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run = None
        return None, hidden.grad if ctx.hidden_grad else None, None, None


def offloaded_checkpoint(function: Callable[..., Any], *args: Any, offload: bool = True) -> Any:
    """A checkpoint function in the form transformers calls (``function(*args)``, recomputed in the backward) that
    keeps ``args[0]``, the layer's input, in host memory meanwhile (on the device with ``offload=False``).

    Falls back to PyTorch's non-reentrant checkpoint where the reentrant form would lose a gradient: another
    argument (positional, or bound in a ``functools.partial``) that requires grad, or no tensor input. With
    gradients off it only calls ``function``: no backward will recompute it (transformers up to 5.22 checkpoints a
    layer in train mode whatever the gradient mode; 5.23 and later only with gradients on).
    """
    if not torch.is_grad_enabled():
        return function(*args)
    hidden, rest = (args[0], args[1:]) if args else (None, ())
    bound = tuple(function.keywords.values()) if isinstance(function, functools.partial) else ()
    if (not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point()
            or any(t.requires_grad for t in _tensors(rest + bound))):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedLayer.apply(lambda h: function(h, *rest), hidden, anchor, offload)


def kept_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """:func:`offloaded_checkpoint` with the layer's input kept on its device (the library's reentrant checkpoint)."""
    return offloaded_checkpoint(function, *args, offload=False)


def _route(layer: nn.Module) -> None:
    """Point transformers' checkpoint function of ``layer`` at the one its flags ask for, keeping the plain one.

    transformers up to 5.22 calls it in ``GradientCheckpointingLayer.__call__``, around a compiled ``forward`` as
    well, so the flags must act there; from 5.23 a compiled layer checkpoints its math itself
    (:class:`~lightning_rl.compiled_layers._CompiledClassForward`) and only an eager one calls it.
    """
    wanted = (offloaded_checkpoint if getattr(layer, _FLAG, False)
              else kept_checkpoint if getattr(layer, _REENTRANT, False) else None)
    current = getattr(layer, "_gradient_checkpointing_func", None)
    ours = current is offloaded_checkpoint or current is kept_checkpoint
    if wanted is None:
        if hasattr(layer, _PLAIN_CHECKPOINT):
            if ours:
                layer._gradient_checkpointing_func = getattr(layer, _PLAIN_CHECKPOINT)
            delattr(layer, _PLAIN_CHECKPOINT)
        return
    if current is None:  # checkpointing is off; enabling it again routes the layer (enable_activation_checkpointing)
        return
    if not ours:
        setattr(layer, _PLAIN_CHECKPOINT, current)
    layer._gradient_checkpointing_func = wanted


def offload_layer_inputs(layer: nn.Module) -> None:
    """Send ``layer``'s input to pinned host memory while a checkpointed training forward keeps it for the backward.

    Call it after transformers set up the checkpointing (which sets each layer's checkpoint function); idempotent.
    A compiled layer (:func:`~lightning_rl.compiled_layers.compile_decoder_layers`) asks :func:`offloads_layer_inputs`
    and runs its compiled math through :func:`offloaded_checkpoint` itself.

    Args:
        layer: a decoder layer whose first argument is the residual stream.
    """
    setattr(layer, _FLAG, True)
    _route(layer)


def keep_layer_inputs(layer: nn.Module) -> None:
    """Undo :func:`offload_layer_inputs`: ``layer``'s input stays on the device again (through the library's
    reentrant checkpoint where :func:`use_reentrant_checkpoint` asked for it, else transformers' own).
    """
    if hasattr(layer, _FLAG):
        delattr(layer, _FLAG)
    _route(layer)


def offloads_layer_inputs(layer: nn.Module) -> bool:
    """Whether :func:`offload_layer_inputs` is on for ``layer``."""
    return getattr(layer, _FLAG, False)


def use_reentrant_checkpoint(layer: nn.Module) -> None:
    """Have ``layer`` checkpoint through :func:`offloaded_checkpoint` also when its input stays on the device
    (idempotent).

    For a layer whose compiled math has an eager part (a sliced MLP, :mod:`lightning_rl.tiled_mlp`): PyTorch's
    non-reentrant checkpoint around its compiled pieces found the recomputation's saved tensors in another order
    than the forward's on an H200 (``CheckpointError``, transformers 5.17, which checkpoints in ``__call__``).
    """
    setattr(layer, _REENTRANT, True)
    _route(layer)


def uses_reentrant_checkpoint(layer: nn.Module) -> bool:
    """Whether :func:`use_reentrant_checkpoint` is on for ``layer``."""
    return getattr(layer, _REENTRANT, False)


__all__ = ["autocast_arguments", "from_host", "in_checkpoint_forward", "keep_layer_inputs", "kept_checkpoint",
           "offload_layer_inputs", "offloaded_checkpoint", "offloads_layer_inputs", "to_host",
           "use_reentrant_checkpoint", "uses_reentrant_checkpoint"]
