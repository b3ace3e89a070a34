"""Truncated importance sampling: correct for the rollout engine sampling from slightly other log-probs.

A vLLM engine (bf16 kernels, other reduction order) samples from ``pi_engine``, while the loss
assumes the samples came from the trainer's ``pi_old``. Weighting each token (or each sequence)
by ``min(pi_old / pi_engine, cap)`` makes the gradient unbiased again up to the truncation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ImportanceLevel = Literal["none", "token", "sequence"]
IMPORTANCE_LEVELS: tuple[str, ...] = ("none", "token", "sequence")


def importance_weights(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    level: ImportanceLevel = "token",
    cap: float = 2.0,
) -> torch.Tensor:
    """Truncated importance weights ``min(exp(trainer_logp - engine_logp), cap)`` (no gradient).

    Args:
        trainer_logp: ``[N, C]`` log-probs of the sampled tokens under the trainer's policy at rollout time.
        engine_logp: ``[N, C]`` log-probs of the same tokens under the engine that sampled them.
        mask: ``[N, C]`` 1 on completion tokens.
        level: ``token`` (one ratio per token), ``sequence`` (the product over a completion's tokens,
            the same for all its tokens) or ``none`` (all ones).
        cap: upper bound of a weight (> 0).

    Returns:
        ``[N, C]`` float32 weights, 0 where ``mask`` is 0.
    """
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    if not cap > 0:
        raise ValueError(f"importance_sampling_cap must be > 0, got {cap}")
    m = mask.float()
    if level == "none":
        return m
    delta = (trainer_logp.detach().float() - engine_logp.detach().float()) * m
    if level == "sequence":
        delta = delta.sum(-1, keepdim=True).expand_as(m)
    # clamp in log space so that a large ratio never overflows before the cap
    return torch.exp(delta.clamp(max=math.log(cap))) * m


def mismatch_terms(
    trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|trainer_logp - engine_logp|, mask)`` as float tensors, for statistics summed on the device."""
    delta = (trainer_logp.detach().float() - engine_logp.detach().float()).abs()
    return delta, mask.float()


def mismatch_stats(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max ``|trainer_logp - engine_logp|`` over completion tokens.

    Returns:
        ``{"logprob_mismatch_mean": ..., "logprob_mismatch_max": ...}`` (0 when the mask is empty).
    """
    delta, m = mismatch_terms(trainer_logp, engine_logp, mask)
    masked = delta * m
    return {"logprob_mismatch_mean": (masked.sum() / m.sum().clamp(min=1)).item(),
            "logprob_mismatch_max": masked.max().item() if masked.numel() else 0.0}


__all__ = ["IMPORTANCE_LEVELS", "ImportanceLevel", "importance_weights", "mismatch_stats", "mismatch_terms"]
