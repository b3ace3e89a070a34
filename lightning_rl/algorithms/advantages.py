"""Advantage estimators as pure functions on reward tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from lightning_rl.algorithms.gae import masked_moments

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Group-relative advantages: reward minus its group's mean, optionally scaled.

    ``group`` is GRPO's outcome supervision, ``(r - mean) / std`` within the group (Shao et al. 2024,
    DeepSeekMath, arXiv:2402.03300, Section 4.1.2); ``none`` leaves out the std as Dr. GRPO does
    (Liu et al. 2025, arXiv:2503.20783).

    Completions are laid out group-contiguous: rows ``[i*G, (i+1)*G)`` share prompt ``i``.
    A reward of NaN (every reward function returned ``None`` for it) is left out of its group's
    statistics and gets advantage 0. A group whose rewards are all equal gets advantage 0.

    Args:
        rewards: ``[B*G]`` total reward per completion.
        num_generations: ``G``, completions per prompt.
        scale_rewards: ``"group"`` divides by the group's std, ``"batch"`` by the std over all
            completions, ``"none"`` does not scale (Dr. GRPO).
        eps: added to the std before dividing.
        reduce: sums a tensor over processes (the strategy's all-reduce): ``"batch"`` then divides by the std
            of every process's rewards, as one process holding the whole batch would. Groups never span
            processes, so the other modes need none.

    Returns:
        ``[B*G]`` float32 advantages.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be a flat tensor whose length is a multiple of num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}"
        )
    r = rewards.float().view(-1, num_generations)
    valid = ~torch.isnan(r)
    count = valid.sum(-1, keepdim=True)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    mean = r0.sum(-1, keepdim=True) / count.clamp(min=1)
    # a group whose rewards are all equal gets exactly 0 (its float mean may be off by rounding)
    hi = torch.where(valid, r, torch.full_like(r, -torch.inf)).amax(-1, keepdim=True)
    lo = torch.where(valid, r, torch.full_like(r, torch.inf)).amin(-1, keepdim=True)
    centered = torch.where(valid & (hi > lo), r - mean, torch.zeros_like(r))
    if scale_rewards == "none":
        return centered.flatten()
    if scale_rewards == "group":
        var = (centered**2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt()
    elif reduce is None:
        flat = r[valid]
        std = flat.std() if flat.numel() > 1 else torch.zeros((), device=r.device)
    else:
        _, _, var = masked_moments(torch.where(valid, r, torch.zeros_like(r)), valid, reduce)
        std = var.sqrt().float()
    adv = centered / (std + eps)
    return adv.flatten()
