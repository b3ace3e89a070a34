"""Policy-gradient losses as pure functions: per-token clipped surrogate, KL, and aggregation.

The papers behind them:

- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, eq. 7 (the
  clipped surrogate).
- GRPO: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, eq. 3 (the objective, averaged per sequence)
  and eq. 4 (the k3 estimate of the KL to the reference).
- DAPO: Yu et al. 2025, arXiv:2503.14476, Section 3.1 (clip-higher: a separate upper clip range) and
  Section 3.3 (token-level loss: one mean over all the batch's tokens).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783 (no per-sequence
  length normalization: a sum over tokens divided by a constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(r - p) - (r - p) - 1`` (DeepSeekMath eq. 4; >= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(policy || reference): ``p - r`` (unbiased, can be negative)."""
    return logp - ref_logp


@dataclass
class SurrogateTerms:
    """Per-token pieces of the clipped surrogate, before aggregation."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
) -> SurrogateTerms:
    """Per-token PPO/GRPO clipped surrogate loss ``-min(r*A, clip(r, 1-eps, 1+eps_high)*A)`` (PPO eq. 7).

    Args:
        logp: ``[B, T]`` log-probs under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the policy that sampled (no grad).
        advantages: ``[B]`` per-sequence or ``[B, T]`` per-token advantages.
        epsilon: lower clip range.
        epsilon_high: upper clip range (DAPO's clip-higher); defaults to ``epsilon``.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    return SurrogateTerms(
        loss=loss,
        ratio=ratio,
        clipped_low=(ratio < 1 - epsilon) & (adv < 0),
        clipped_high=(ratio > 1 + eps_high) & (adv > 0),
    )


def token_weights(
    mask: torch.Tensor,
    loss_type: LossType,
    max_completion_length: int | None = None,
    micro_batch_size: int | None = None,
    num_processes: int = 1,
    global_num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights ``w`` such that a batch's loss is ``sum(per_token_loss * w)``.

    Computed once for the whole optimizer step's batch, so splitting it into micro-batches (and
    summing their gradients) gives exactly the same loss.

    * ``grpo``: mean over tokens of each sequence, then mean over sequences (GRPO eq. 3).
    * ``bnpo``: mean over the tokens of each micro-batch, then mean over micro-batches.
    * ``dr_grpo``: sum over tokens divided by ``sequences * max_completion_length`` (Dr. GRPO).
    * ``dapo``: sum over tokens divided by the number of tokens in the whole (global) batch (DAPO Section 3.3).

    Args:
        mask: ``[B, T]`` 1 for tokens that count, 0 elsewhere.
        loss_type: one of ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``.
        max_completion_length: the generation limit (``dr_grpo``); defaults to ``T``.
        micro_batch_size: sequences per micro-batch (``bnpo``); defaults to ``B``.
        num_processes: data-parallel processes; the gradients are averaged over them.
        global_num_tokens: tokens summed over all processes (``dapo``), a number or a tensor (kept on the device:
            no host read); defaults to this batch's count times ``num_processes``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    m = mask.float()
    b, t = m.shape
    if loss_type == "grpo":
        per_seq = m.sum(-1, keepdim=True).clamp(min=1)
        return m / per_seq / b
    if loss_type == "dr_grpo":
        return m / (b * (max_completion_length or t))
    if loss_type == "dapo":
        total = global_num_tokens if global_num_tokens is not None else m.sum() * num_processes
        return m * num_processes / torch.as_tensor(total, dtype=m.dtype, device=m.device).clamp(min=1.0)
    mbs = micro_batch_size or b
    w = torch.zeros_like(m)
    chunks = range(0, b, mbs)
    for start in chunks:
        sl = slice(start, start + mbs)
        w[sl] = m[sl] / m[sl].sum().clamp(min=1)
    return w / len(chunks)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (0 when nothing is set)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)
