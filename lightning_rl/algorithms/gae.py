"""Generalized advantage estimation over right-padded token sequences, whitening, explained variance.

Every function takes ``[B, T]`` tensors laid out like a :class:`~lightning_rl.rollout.Rollout`'s
completions: ``mask`` is 1 on a prefix of each row (the real tokens) and 0 on the right padding.
The episode ends at the last real token: nothing is bootstrapped past it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def check_discount(name: str, value: float) -> float:
    """Refuse a discount (``gamma``) or GAE ``lambda`` outside ``[0, 1]``."""
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}; 1.0 means no discounting")
    return float(value)


def not_right_padded(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` True where a row of the ``[N, T]`` ``mask`` has a 1 after a 0 (its 1s are not one prefix)."""
    m = mask.bool()
    return (m[:, 1:] & ~m[:, :-1]).any(-1)


def check_right_padded(mask: torch.Tensor) -> None:
    """Refuse a mask that is not 1 on a prefix of each row (holes or left padding)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, tokens], got shape {tuple(mask.shape)}")
    bad = not_right_padded(mask)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"mask rows {rows[:8]} are not right-padded (a 1 follows a 0); GAE needs the real tokens of each "
            "sequence first and padding after them, as in Rollout.completion_mask"
        )


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, Section 3).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last real token taken as 0
    (terminal), and ``A_t = delta_t + gamma * lam * A_{t+1}``.

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` value estimates ``V(s_t)`` (no grad).
        mask: ``[B, T]`` 1 on real tokens (a prefix of each row), 0 on padding.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]`` (0: one-step TD, 1: Monte Carlo minus the value).

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` float32 and 0 on padding; ``returns = A + V``.
    """
    gamma, lam = check_discount("gamma", gamma), check_discount("lam", lam)
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards, values and mask must have the same [B, T] shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)} and {tuple(mask.shape)}"
        )
    check_right_padded(mask)
    m = mask.float()
    r = rewards.float() * m
    v = values.float() * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # 0 after the last real token
    deltas = r + gamma * next_v - v
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        running = (deltas[:, t] + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + v) * m


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased variance of ``x`` where ``mask`` is set, as tensors (nothing is read back).

    The variance is 0 under two values.

    Args:
        x: values.
        mask: where ``x`` counts.
        reduce: sums a tensor over processes (e.g. the strategy's all-reduce), so the statistics are
            those of every process's values together; None: this process's only.
    """
    m = mask.double()
    xd = x.double()
    sums = torch.stack([m.sum(), (xd * m).sum(), (xd * xd * m).sum()])
    if reduce is not None:
        sums = reduce(sums)
    count = sums[0].round()
    mean = sums[1] / count.clamp(min=1)
    var = ((sums[2] - count * mean * mean) / (count - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(count > 1, var, torch.zeros_like(var))
    return count, mean.to(x.dtype), var.to(x.dtype)


def masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean, unbiased variance and count (an int, read back) of ``x`` where ``mask`` is set (:func:`masked_moments`)."""
    count, mean, var = masked_moments(x, mask, reduce)
    return mean, var, int(count.item())


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale ``x`` to unit variance over the masked positions (and zero mean unless ``shift_mean=False``).

    Fewer than two masked values cannot be scaled: they are only centered. Padding comes back 0.
    ``reduce`` (see :func:`masked_mean_var`) whitens with the statistics of all processes.
    """
    mean, var, count = masked_mean_var(x.float(), mask, reduce)
    m = mask.float()
    if count < 2:
        out = x.float() - mean if shift_mean else x.float()
        return out * m
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens: a 0-d tensor, NaN for constant returns.

    Computed on the device without reading anything back, so a training step can log it with its other statistics.
    """
    count, _, var_r = masked_moments(returns.float(), mask)
    _, _, var_d = masked_moments(returns.float() - values.float(), mask)
    return torch.where((count >= 2) & (var_r != 0), 1.0 - var_d / var_r, torch.full_like(var_r, math.nan))


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of ``x`` where ``mask`` is set, a 0-d tensor (0 under two values)."""
    return masked_moments(x.float(), mask)[2].sqrt()
