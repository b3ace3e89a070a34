"""Completions packed into one row without padding for the policy's forward: a prototype, not yet used.

The update pads every completion to the rollout's longest. With SmolLM2 on arithmetic prompts the mean completion
is about 47 of 128 tokens, so about 22k tokens go through the model where 12k are real. Here each sequence's real
tokens (its prompt without left padding, its completion without right padding) are laid end to end in one row;
positions restart at each sequence, and attention stays within a sequence through its cumulative lengths
(``cu_seq_lens_*``, which transformers passes to a registered attention function). On CUDA that is PyTorch's
variable-length flash attention; elsewhere one ``scaled_dot_product_attention`` per sequence (for tests).

Not yet run on a GPU (``bench/results/vs_trl_NOTES.md``, twentieth visit: what to check first).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rl.models import unwrap

ATTENTION = "lightning_rl_packed"
_VARLEN_PARAMS: frozenset[str] = frozenset()  # varlen_attn's keyword names, read once outside compiled code


@dataclass
class PackedRows:
    """Sequences laid end to end in one row.

    Attributes:
        input_ids: ``[1, T]`` the real tokens of every sequence, in order.
        position_ids: ``[1, T]`` positions restarting at 0 at each sequence.
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths (the attention's boundaries).
        max_len: the longest sequence.
        targets_at: ``[n]`` index in ``T`` of the hidden state that predicts each completion token, in the row-major
            order of ``completion_mask``'s ones.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    targets_at: torch.Tensor


def pack_rows(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> PackedRows:
    """Pack left-padded prompts and right-padded completions (the :class:`~lightning_rl.rollout.Rollout` layout).

    Raises:
        ValueError: a prompt without tokens (no state would predict its completion's first token).
    """
    prompt_len = prompt_mask.sum(-1)
    if bool((prompt_len == 0).any()):
        raise ValueError("a prompt without tokens cannot be packed: each completion's first token needs one before it")
    mask = torch.cat([prompt_mask, completion_mask], 1).bool()
    lengths = mask.sum(-1)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)[mask].unsqueeze(0)
    cu = F.pad(lengths.cumsum(0), (1, 0))
    starts = torch.repeat_interleave(cu[:-1], lengths)
    position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) - starts).unsqueeze(0)
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    targets_at = cu[:-1][rows] + prompt_len[rows] - 1 + cols
    return PackedRows(input_ids, position_ids, cu.to(torch.int32), int(lengths.max()), targets_at)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                         scale: float | None) -> torch.Tensor:
    """Causal attention within each sequence of packed ``[T, H, D]`` tensors, one sequence at a time."""
    out = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                     scale: float | None) -> torch.Tensor:
    """PyTorch's variable-length flash attention, causal; K/V heads repeated when it takes no GQA."""
    from torch.nn.attention.varlen import varlen_attn

    params = _VARLEN_PARAMS
    kwargs: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params and scale is not None:
        kwargs["scale"] = scale
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function over one packed row: ``[1, H, T, D]`` in, ``[1, T, H, D]`` out."""
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = _flash_attention(q, k, v, cu, max_len, scaling) if q.is_cuda else _reference_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register_packed_attention() -> None:
    """Make :data:`ATTENTION` a transformers attention implementation (idempotent)."""
    global _VARLEN_PARAMS
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    if not _VARLEN_PARAMS:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # an older torch: the CPU path still works, CUDA raises at the first call
            return
        _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)


@contextlib.contextmanager
def attention_packed(model: nn.Module) -> Iterator[None]:
    """Within: ``model`` attends with :func:`packed_attention` (its config's implementation is put back after)."""
    register_packed_attention()
    config = unwrap(model).config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


__all__ = ["ATTENTION", "PackedRows", "attention_packed", "pack_rows", "packed_attention",
           "register_packed_attention"]
