"""Sequences packed into one row without padding for the log-prob forwards (``pack_sequences``).

The update pads every completion to the rollout's longest. With SmolLM2 on arithmetic prompts the mean completion
is about 47 of 128 tokens, so about 22k tokens went through the model where 12k were real. Here each sequence's
real tokens (its prompt without left padding, its completion without right padding) are laid end to end in one
row; positions restart at each sequence, and attention stays within a sequence through its cumulative lengths
(``cu_seq_lens_*``, which transformers passes to a registered attention function). On CUDA that is PyTorch's
variable-length flash attention in the autocast dtype; elsewhere one ``scaled_dot_product_attention`` per
sequence (for tests). On an H200 the README configuration's trainer peaked at 0.62 GiB of PyTorch's memory
against 0.86 padded, with the same log-probs (``bench/results/vs_trl_NOTES.md``, twenty-first visit).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lightning_rl.models import backbone_output, unwrap

ATTENTION = "lightning_rl_packed"
_VARLEN_PARAMS: frozenset[str] = frozenset()  # varlen_attn's keyword names, read once outside compiled code
_UNPACKED: dict[int, str] = {}  # id(config) -> the attention implementation a model had before the packed one
_STATE = threading.local()  # .packing: within packed_forward (this thread): no mask to build, the lengths bound it


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
        completion_rows: ``[n]`` index of each of those tokens in ``completion_ids.flatten()``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    targets_at: torch.Tensor
    completion_rows: torch.Tensor


_EMPTY_PROMPT = "a prompt without tokens cannot be packed: each completion's first token needs one before it"


def pack_rows(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PackedRows:
    """Pack left-padded prompts and right-padded completions (the :class:`~lightning_rl.rollout.Rollout` layout).

    With ``lengths``, each row's prompt and completion lengths in host memory, the indices are computed on the host
    and sent to the device in one asynchronous copy: the masks are not read (:func:`pack_lengths`). Without, they
    come from the masks where these live, which on a GPU reads the device a few times (output sizes, the longest
    sequence).

    Raises:
        ValueError: a prompt without tokens (no state would predict its completion's first token).
    """
    if lengths is not None:
        return pack_lengths(prompt_ids, completion_ids, *lengths)
    prompt_len = prompt_mask.sum(-1)
    if bool((prompt_len == 0).any()):
        raise ValueError(_EMPTY_PROMPT)
    mask = torch.cat([prompt_mask, completion_mask], 1).bool()
    seq_len = mask.sum(-1)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)[mask].unsqueeze(0)
    cu = F.pad(seq_len.cumsum(0), (1, 0))
    starts = torch.repeat_interleave(cu[:-1], seq_len)
    position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) - starts).unsqueeze(0)
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    targets_at = cu[:-1][rows] + prompt_len[rows] - 1 + cols
    return PackedRows(input_ids, position_ids, cu.to(torch.int32), int(seq_len.max()), targets_at,
                      rows * completion_ids.shape[1] + cols)


def pack_lengths(
    prompt_ids: torch.Tensor, completion_ids: torch.Tensor, prompt_len: torch.Tensor, completion_len: torch.Tensor
) -> PackedRows:
    """:func:`pack_rows` from each row's prompt and completion lengths (``[N]`` integer tensors in host memory).

    The layout makes each row's real tokens one contiguous run of ``cat([prompt_ids, completion_ids], 1)``: the last
    ``prompt_len`` prompt columns, then the first ``completion_len`` completion columns. Every index is computed
    on the host and reaches the device in one asynchronous copy (pinned memory on CUDA), so the packing never waits
    for the device, where the masks' version reads it for output sizes five times a forward. The host arithmetic is
    numpy's, on one thread: PyTorch's CPU kernels would run the larger of these arrays on its intra-op thread pool,
    whose idle threads then spin beside the update and the engine.
    """
    pl, cl = np.asarray(prompt_len.cpu(), dtype=np.int64), np.asarray(completion_len.cpu(), dtype=np.int64)
    if (pl == 0).any():
        raise ValueError(_EMPTY_PROMPT)
    n, p = prompt_ids.shape
    c = completion_ids.shape[1]
    if pl.shape != (n,) or cl.shape != (n,) or (pl > p).any() or (cl > c).any():
        raise ValueError(f"lengths of shape {pl.shape} / {cl.shape} do not fit {n} rows of {p} prompt and {c} "
                         "completion columns")
    seq_len = pl + cl
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(seq_len, out=cu[1:])
    total = int(cu[-1])
    sequence = np.repeat(np.arange(n), seq_len)  # each packed token's row
    offset = np.arange(total) - cu[:-1][sequence]  # its place in its sequence: the position id
    source = sequence * (p + c) + (p - pl)[sequence] + offset  # its index in cat(...).flatten()
    at = np.flatnonzero(offset >= pl[sequence])  # the completion tokens' places in the packed row, in row order
    row = sequence[at]
    col = offset[at] - pl[row]
    parts = (source, offset, cu, at - 1, row * c + col)  # each is predicted by the state one place before it
    device = prompt_ids.device
    host = torch.empty(sum(a.size for a in parts), dtype=torch.int64, pin_memory=device.type == "cuda")
    np.concatenate(parts, out=host.numpy())
    index = host.to(device, non_blocking=True)
    source_d, offset_d, cu_d, targets_d, rows_d = index.split([a.size for a in parts])
    input_ids = torch.cat([prompt_ids, completion_ids], 1).flatten()[source_d].unsqueeze(0)
    max_len = int(seq_len.max()) if n else 0
    return PackedRows(input_ids, offset_d.unsqueeze(0), cu_d.to(torch.int32), max_len, targets_d, rows_d)


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
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A transformers attention function: over one packed row when given ``cu_seq_lens_q``, else the model's own.

    Packed: ``[1, H, T, D]`` in, ``[1, T, H, D]`` out. A call without cumulative lengths (a padded forward, the
    embedded ``generate``) goes to the implementation the model had before :func:`use_packed_attention`.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        fallback = _own_attention(module)
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported):
            raise ValueError(f"packed sequences do not support {unsupported}: set pack_sequences=False")
    max_len = int(kwargs["max_length_q"])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    dtype = torch.get_autocast_dtype("cuda") if q.is_cuda and torch.is_autocast_enabled("cuda") else q.dtype
    if q.is_cuda and dtype in (torch.float16, torch.bfloat16):  # flash attention takes half precision only
        out = _flash_attention(*(t.to(dtype) for t in (q, k, v)), cu, max_len, scaling)
    else:
        out = _reference_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _own_attention(module: nn.Module) -> Any:
    """The attention function ``module``'s model had before :func:`use_packed_attention` (sdpa if unknown)."""
    name = _UNPACKED.get(id(getattr(module, "config", None)), "sdpa")
    if name == "eager":  # not in the registry: each model file defines its own
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is not None:
            return own
    return ALL_ATTENTION_FUNCTIONS.get(name) or ALL_ATTENTION_FUNCTIONS["sdpa"]


def _mask(config: Any = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask for :data:`ATTENTION`: none for a packed forward, else the one the model's own attention takes."""
    if getattr(_STATE, "packing", False):
        return None
    own = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(_UNPACKED.get(id(config), "sdpa"), sdpa_mask)
    return own(config=config, **kwargs)


def packing_unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s sequences cannot be packed, or None when they can.

    A model must read its attention function from transformers' registry (``_supports_attention_backend``), or it
    would attend across the packed sequences; sliding windows and soft-capped logits are not handled here.
    """
    net = unwrap(model)
    config = getattr(net, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return f"{type(net).__name__} is not a transformers model"
    if not getattr(net, "_supports_attention_backend", False):
        return f"{type(net).__name__} does not take a registered attention function"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"{type(net).__name__} has layers of {sorted(set(layer_types) - {'full_attention'})}"
    if layer_types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{type(net).__name__} attends through a sliding window"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{type(net).__name__} soft-caps its attention logits"
    if next(net.parameters()).is_cuda and _varlen_params() is None:
        return "this PyTorch has no torch.nn.attention.varlen (PyTorch 2.10 or newer)"
    return None


@functools.cache
def _varlen_params() -> frozenset[str] | None:
    """``varlen_attn``'s parameter names, or None when this PyTorch has no ``torch.nn.attention.varlen``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def register_packed_attention() -> None:
    """Make :data:`ATTENTION` a transformers attention implementation, with its mask (idempotent)."""
    global _VARLEN_PARAMS
    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    _VARLEN_PARAMS = _varlen_params() or frozenset()  # none in an older torch: CUDA raises at the first call


def use_packed_attention(model: nn.Module) -> None:
    """Let ``model`` attend with :func:`packed_attention` from now on (idempotent).

    The switch stays: a gradient checkpoint recomputes its layers in the backward, after the forward returned,
    and must attend as the forward did. Forwards without cumulative lengths keep the model's own attention.
    ``_attn_implementation`` is not saved with the config, so a saved model loads as before.
    """
    register_packed_attention()
    config = unwrap(model).config
    if config._attn_implementation != ATTENTION:
        _UNPACKED[id(config)] = config._attn_implementation
        config._attn_implementation = ATTENTION


def packed_forward(model: nn.Module, body: nn.Module, packed: PackedRows, max_len: int) -> torch.Tensor:
    """``body`` (``model``'s backbone, switched by :func:`use_packed_attention`) over ``packed``: ``[T, hidden]``.

    ``max_len`` bounds a sequence's length for the attention kernel; a bound fixed for the run keeps compiled
    layers from recompiling when a rollout's longest sequence changes. Under FSDP2 the backbone runs inside
    ``model``'s forward (:func:`~lightning_rl.models.backbone_output`).
    """
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                  cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                  max_length_q=max_len, max_length_k=max_len)
    _STATE.packing = True
    try:
        out = backbone_output(model, body, inputs)
    finally:
        _STATE.packing = False
    return (out[0] if isinstance(out, tuple) else out.last_hidden_state)[0]


__all__ = ["ATTENTION", "PackedRows", "pack_lengths", "pack_rows", "packed_attention", "packed_forward",
           "packing_unsupported", "register_packed_attention", "use_packed_attention"]
