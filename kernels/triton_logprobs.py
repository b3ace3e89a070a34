"""Triton per-token log-probs and entropy from hidden states, never building ``[N, V]`` logits.

Same contract as :func:`lightning_rl.kernels.reference.token_logprobs_entropy_reference`. The
forward (``triton_logprobs_forward``) walks vocabulary tiles with an online log-sum-exp and keeps
only per-row scalars (``lse``, entropy); the backward (``triton_logprobs_backward``) recomputes
the logit tiles, walking token groups (outer loop) and vocabulary chunks (inner loop). Extra memory:
a few ``[N]`` vectors and per-split partial sums in the forward; in the backward one bounded
``[rows, Vc]`` gradient chunk (``dz_chunk_bytes``, 32 MiB by default) and an fp32 ``[rows, H]`` dh
accumulator for the current token group (``dh_acc_bytes``, 24 MiB by default) when ``hidden`` is
bf16/fp16, so the scratch stays near 56 MiB at any hidden size.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import check_inputs

IGNORE_INDEX = -100

#: Tile sizes and scratch bounds. GPU: 128 tokens x 256 vocabulary tiles, 64-deep K steps, tiles loaded
#: through TMA tensor descriptors (``tma``; pointer loads where TMA is unavailable): the fastest
#: setting measured on an H100 (``bench/results/logprob_kernel_NOTES.md``). The interpreter uses the
#: smallest tiles ``tl.dot`` accepts so the CPU tests stay fast. Other variant flags (see
#: ``triton_logprobs_forward``): ``even_k`` (no K masks when ``BLOCK_K`` divides ``H``; pointer loads
#: only), ``flatten`` (one pipelined loop over tiles and K), ``cublas`` (logits by cuBLAS into an fp32
#: chunk, Triton only for the row reductions / dz; ``fwd_chunk_bytes`` bounds its forward chunk,
#: ``RED_BLOCK_N``/``RED_BLOCK_V`` its reduction tiles).
GPU_CONFIG: dict[str, int] = {
    "tma": 1,
    "BLOCK_N": 128,
    "BLOCK_V": 256,
    "BLOCK_K": 64,
    "num_warps": 8,
    "num_stages": 3,
    "dz_chunk_bytes": 32 << 20,
    "dh_acc_bytes": 24 << 20,
}
INTERPRETER_CONFIG: dict[str, int] = {
    "BLOCK_N": 16,
    "BLOCK_V": 32,
    "BLOCK_K": 16,
    "num_warps": 4,
    "num_stages": 1,
    "dz_chunk_bytes": 16 * 64 * 4,  # several chunks even at test sizes
    "dh_acc_bytes": 16 * 32 * 4,  # several token groups once N > 32 (H=16) or N > 16 (H=32)
}


def is_available(tensor: torch.Tensor | None = None) -> bool:
    """True when Triton imports and ``tensor`` is on CUDA (any tensor with ``TRITON_INTERPRET=1``).

    Args:
        tensor: the hidden states to run on; None checks for any CUDA device instead.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return tensor.is_cuda if tensor is not None else torch.cuda.is_available()


def _config(hidden: torch.Tensor, override: dict[str, int] | None) -> dict[str, int]:
    base = dict(GPU_CONFIG if hidden.is_cuda else INTERPRETER_CONFIG)
    if hidden.is_cuda and hidden.dtype in (torch.float32, torch.float64):
        base["BLOCK_K"] = 32  # fp32 tiles take twice the shared memory per pipeline stage
    return {**base, **(override or {})}


class _TritonTokenLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, config):  # noqa: D102
        from . import triton_logprobs_forward as fwd

        h, w, b = _prepare(hidden, weight, bias)
        valid = targets != IGNORE_INDEX
        inv_t = 1.0 / temperature
        logp, ent, lse = fwd.forward(h, w, b, targets.contiguous(), inv_t, config)
        zero = torch.zeros_like(logp)
        logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.inv_t, ctx.config = inv_t, config
        if hidden.dtype == torch.float64:  # match the reference's output dtype
            logp, ent = logp.double(), ent.double()
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):  # noqa: D102
        from . import triton_logprobs_backward as bwd

        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None, None
        valid = targets != IGNORE_INDEX
        gl = _row_grad(grad_logp, valid)
        ge = _row_grad(grad_ent, valid)
        h, w, b = _prepare(hidden, weight, bias)
        dh, dw, db = bwd.backward(
            h, w, b, targets.contiguous(), lse, ent, gl, ge, ctx.inv_t, needs, ctx.config, dw_dtype=weight.dtype
        )
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
            None,
            None,
        )


def _prepare(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Contiguous ``h, W`` in one compute dtype (hidden's; fp64 runs as fp32), bias as is."""
    dtype = torch.float32 if hidden.dtype == torch.float64 else hidden.dtype
    h = hidden.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()  # a copy only for mixed dtypes (e.g. fp32 weight, bf16 hidden)
    b = None if bias is None else bias.contiguous()
    return h, w, b


def _row_grad(grad: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, grad.float(), 0.0).contiguous()


def token_logprobs_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(target)`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: final hidden states ``[N, H]``, bf16/fp16/fp32 (fp64 is computed in fp32).
        weight: LM head weight ``[V, H]``; tied embeddings work (pass the embedding matrix). A
            dtype other than ``hidden``'s is cast to it (one copy of the weight).
        targets: token ids ``[N]``; positions equal to ``-100`` give 0 and no gradient.
        bias: optional LM head bias ``[V]``.
        temperature: sampling temperature the logits are divided by.
        config: optional overrides of :data:`GPU_CONFIG` (tiles, ``num_warps``, ``num_stages``,
            ``dz_chunk_bytes``, ``dh_acc_bytes``) and the variant flags ``tma``, ``even_k``,
            ``cublas``; for benchmarks.

    Returns:
        ``(logp, entropy)``, each ``[N]`` in float32 (float64 for float64 inputs).
    """
    check_inputs(hidden, weight, targets, temperature)
    if not is_available(hidden):
        raise RuntimeError("the Triton kernel needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    cfg = _config(hidden, config)
    return _TritonTokenLogprobsEntropy.apply(hidden, weight, bias, targets, float(temperature), cfg)
