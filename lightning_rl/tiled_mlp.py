"""The decoder layers' MLPs computed over slices of the tokens during the update.

In a checkpointed backward the recomputed layer holds its MLP's intermediate tensors for every token of the
micro-batch at once: the gate and up projections, their product and their gradients, each
``[tokens, intermediate_size]``. A first-step allocation history on an H200 (bench/results/vs_trl_NOTES.md,
twenty-fourth visit) found four such tensors of 207 MiB at the backward's peak of a Qwen2.5-0.5B-shaped full
fine-tune (22k packed tokens, intermediate 4,864), and eight of 35 MiB at SmolLM2's LoRA peak.

:func:`tile_decoder_mlps` makes each decoder layer's MLP keep only its input for the backward and recompute itself
there slice by slice (:class:`TiledMLPFunction`), so its intermediates exist for one slice at a time.
:func:`mlp_slices` picks ``ceil(intermediate / hidden)`` slices: one slice's intermediate is then about as large as
the layer's input. An MLP is token-wise (each output row depends on its own input row only), so slicing changes no
value beyond the matmuls' accumulation order. The parameters' gradients are summed over the slices and handed to
autograd once, so gradient hooks (gradients sent to host memory, DDP's reducer) see one gradient per parameter and
backward. It costs one more forward of each MLP per update.

Off by default: the modules' ``tile_mlps=True`` turns it on, and :func:`check_tiling` says where it cannot run.
Only an MLP in train mode slices: with gradients on through :class:`TiledMLPFunction`, without them (a reentrant
checkpoint's first pass, a no-grad forward over the update's tokens) slice after slice. Generation and evaluation
(eval mode) run the MLP as it is. An MLP with active dropout (its recomputation would draw other masks) or one that
routes tokens to experts is left alone. Under compiled decoder layers (:mod:`lightning_rl.compiled_layers`) the
sliced MLP runs eagerly between the two compiled halves of the layer, and the layer checkpoints through the
library's reentrant checkpoint (see :func:`check_tiling`).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_rl.checkpoint_offload import autocast_arguments, use_reentrant_checkpoint
from lightning_rl.compiled_layers import decoder_layers
from lightning_rl.models import unwrap


def mlp_slices(hidden_size: int, intermediate_size: int | None) -> int:
    """Slices of the tokens whose MLP intermediates are each about one ``[tokens, hidden]`` tensor."""
    if not intermediate_size or hidden_size < 1:
        return 1
    return max(1, math.ceil(intermediate_size / hidden_size))


def sliced(run: Callable[[torch.Tensor], torch.Tensor], slices: int, x: torch.Tensor) -> torch.Tensor:
    """``run`` applied to ``slices`` row slices of ``x`` in turn, their outputs written into one tensor.

    Only one slice's intermediates exist at a time; without autograd (the caller's grad mode decides) nothing of
    them is kept.
    """
    rows = x.reshape(-1, x.shape[-1])
    out: torch.Tensor | None = None
    start = 0
    for part in rows.tensor_split(slices):
        piece = run(part)
        if out is None:
            out = piece.new_empty((rows.shape[0], piece.shape[-1]))
        out[start:start + part.shape[0]] = piece
        start += part.shape[0]
    assert out is not None
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledMLPFunction(torch.autograd.Function):
    """``run(x)`` over ``slices`` row slices of ``x``; the backward recomputes each slice and sums its gradients.

    ``params`` are the parameters ``run`` reads that need gradients: their gradients come back as this function's
    own, one per parameter. Only ``x`` is kept for the backward.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], torch.Tensor], slices: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        """``run`` over the row slices of ``x`` (autograd runs it without gradients); keeps ``x`` only."""
        ctx.run, ctx.slices, ctx.params = run, slices, params
        ctx.autocast = autocast_arguments(x.device.type)
        ctx.save_for_backward(x)
        return sliced(run, slices, x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Recompute each slice under the forward's autocast; ``x``'s gradient and the parameters' summed ones."""
        (x,) = ctx.saved_tensors
        params: tuple[torch.Tensor, ...] = ctx.params
        need_x = ctx.needs_input_grad[2]
        need_params = [ctx.needs_input_grad[3 + i] for i in range(len(params))]
        rows = x.reshape(-1, x.shape[-1])
        grads_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        wanted = [i for i, need in enumerate(need_params) if need]
        start = 0
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            for part, g in zip(rows.tensor_split(ctx.slices), grads_out.tensor_split(ctx.slices)):
                leaf = part.detach().requires_grad_(need_x)
                out = ctx.run(leaf)
                inputs = ([leaf] if need_x else []) + [params[i] for i in wanted]
                grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
                if need_x:
                    grad_x[start:start + part.shape[0]] = grads[0]
                    grads = grads[1:]
                for i, grad in zip(wanted, grads, strict=True):
                    if grad is not None:
                        sums[i] = grad if sums[i] is None else sums[i].add_(grad)
                start += part.shape[0]
        return (None, None, grad_x.view_as(x) if need_x else None, *sums)


class _TiledForward:
    """An MLP's ``forward`` that slices the tokens in train mode and runs the MLP's own ``forward`` otherwise.

    With autograd on it slices through :class:`TiledMLPFunction`; without (the first pass of a reentrant checkpoint,
    a no-grad forward over an update's tokens) it runs the slices in turn, so that pass never holds the whole
    MLP's intermediates either.
    """

    def __init__(self, eager: Callable[..., torch.Tensor], slices: int) -> None:
        self.eager = eager
        self.slices = slices

    @torch.compiler.disable
    def __call__(self, mlp: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not mlp.training or x.dim() < 2:
            return self.eager(mlp, x, *args, **kwargs)
        slices = min(self.slices, x.numel() // max(1, x.shape[-1]))
        if slices <= 1:
            return self.eager(mlp, x)
        run = functools.partial(self.eager, mlp)
        if not torch.is_grad_enabled():
            return sliced(run, slices, x)
        params = tuple(p for p in mlp.parameters() if p.requires_grad)
        if not (params or x.requires_grad):
            return sliced(run, slices, x)
        return TiledMLPFunction.apply(run, slices, x, *params)


def tiling_unsupported_reason(mlp: nn.Module) -> str | None:
    """Why ``mlp`` cannot be sliced over tokens (None when it can)."""
    name = type(mlp).__name__.lower()
    if any(word in name for word in ("moe", "sparse", "expert")):
        return f"{type(mlp).__name__} routes tokens to experts"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in mlp.modules()):
        return f"{type(mlp).__name__} has dropout, which its recomputation would draw again"
    return None


def tile_decoder_mlps(model: nn.Module) -> int:
    """Slice each decoder layer's ``mlp`` over the tokens during the update (idempotent).

    Args:
        model: a transformers causal LM, or a peft wrapper of one.

    Returns:
        The number of decoder layers whose MLP now slices its tokens.
    """
    config = unwrap(model).config.get_text_config()  # the decoder's sizes (a multimodal model's text part)
    slices = mlp_slices(config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    if slices <= 1:
        return 0
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module) or tiling_unsupported_reason(mlp):
            continue
        if not is_tiled(mlp):
            mlp.forward = types.MethodType(_TiledForward(type(mlp).forward, slices), mlp)  # state dicts unchanged
        use_reentrant_checkpoint(layer)  # compiled, the layer checkpoints through the library's own checkpoint
        count += 1
    return count


def is_tiled(mlp: nn.Module) -> bool:
    """Whether ``mlp``'s ``forward`` slices its tokens in the update (set by :func:`tile_decoder_mlps`)."""
    return isinstance(getattr(vars(mlp).get("forward"), "__func__", None), _TiledForward)


def tiled_mlp_count(model: nn.Module) -> int:
    """How many decoder layers of ``model`` slice their MLP's tokens in the update."""
    return sum(is_tiled(getattr(m, "mlp", None)) for m in decoder_layers(model)
               if isinstance(getattr(m, "mlp", None), nn.Module))


def check_tiling(tile_mlps: bool, sharded: bool) -> None:
    """Refuse ``tile_mlps`` where it does not run: with FSDP2-sharded layers.

    Those gather their weights per layer, which the slices' recomputation in the backward was not checked against.
    Compiled layers slice on any device: a compiled layer with a sliced MLP checkpoints through the library's own
    reentrant checkpoint (:func:`~lightning_rl.checkpoint_offload.offloaded_checkpoint`, its input offloaded or
    kept). PyTorch's non-reentrant checkpoint around such a layer's compiled pieces stopped a packed GRPO fit on an
    H200 (torch 2.11): its recomputation saved the tensors in another order than the forward had
    (``CheckpointError``); the reentrant checkpoint compares nothing of the kind.

    Raises:
        ValueError: ``tile_mlps`` with sharded layers.
    """
    if not tile_mlps:
        return
    if sharded:
        raise ValueError("tile_mlps=True under ModelParallelStrategy (FSDP2-sharded layers) is not supported; "
                         "drop tile_mlps")
