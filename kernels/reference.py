"""Pure-torch reference: per-token log-probs and entropy from hidden states, in token chunks.

The forward and the backward each walk the tokens in chunks of ``chunk_size`` rows, so at most
``[chunk_size, vocab]`` logits exist at any time; the backward recomputes them instead of keeping
them. This is the fallback for CPUs and the ground truth the Triton kernels are checked against.
Autocast is switched off inside: under ``bf16-mixed`` the logits would otherwise be rounded to
bf16 (a rounding step of 1/8 for logits between 16 and 32), where the Triton kernel keeps them in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_stats(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return scaled logits, log-softmax and entropy for one chunk, in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        z = h.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return z, logp_all, entropy


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _TokenLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):  # noqa: D102
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        logp = torch.zeros(n, dtype=acc, device=hidden.device)
        ent = torch.zeros(n, dtype=acc, device=hidden.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            _, logp_all, e = _chunk_stats(hidden[sl], weight, bias, temperature)
            logp[sl] = logp_all.gather(-1, safe_targets[sl, None]).squeeze(-1)
            ent[sl] = e
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ent = torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):  # noqa: D102
        hidden, weight, bias, targets, valid = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = _acc_dtype(hidden)
        grad_logp = torch.zeros_like(valid, dtype=acc) if grad_logp is None else grad_logp.to(acc)
        grad_ent = torch.zeros_like(valid, dtype=acc) if grad_ent is None else grad_ent.to(acc)
        grad_logp = grad_logp * valid
        grad_ent = grad_ent * valid
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], cs):
            sl = slice(start, start + cs)
            _, logp_all, e = _chunk_stats(hidden[sl], weight, bias, t)
            p = logp_all.exp()
            # d logp_y / dz = onehot(y) - p ;  d H / dz = -p * (log p + H)
            dz = -p * (grad_logp[sl, None] + grad_ent[sl, None] * (logp_all + e[:, None]))
            dz.scatter_add_(-1, targets[sl, None], grad_logp[sl, None])
            dz = dz / t
            with torch.autocast(hidden.device.type, enabled=False):
                if need_h:
                    dh[sl] = (dz @ weight.to(acc)).to(hidden.dtype)
                if need_w:
                    dw += dz.t() @ hidden[sl].to(acc)
            if need_b:
                db += dz.sum(0)
        return (
            dh,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
            None,
            None,
        )


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Refuse shapes or a temperature the log-prob functions cannot take (shared by every backend)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(target)`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: final hidden states ``[N, H]`` (any float dtype; math runs in fp32).
        weight: LM head weight ``[V, H]`` (tied embeddings work: pass the embedding matrix).
        targets: token ids ``[N]``; positions equal to ``-100`` give 0 and no gradient.
        bias: optional LM head bias ``[V]``.
        temperature: sampling temperature the logits are divided by.
        chunk_size: rows per chunk; peak extra memory is about ``chunk_size * V * 12`` bytes.

    Returns:
        ``(logp, entropy)``, each ``[N]`` in float32 (float64 for float64 inputs).
    """
    check_inputs(hidden, weight, targets, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _TokenLogprobsEntropy.apply(hidden, weight, bias, targets, float(temperature), int(chunk_size))


def token_logprobs_entropy_dense(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the reference through plain autograd on the full logits (tests, baselines)."""
    acc = _acc_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)
