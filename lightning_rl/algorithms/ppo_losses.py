"""PPO pieces as pure functions: KL-shaped token rewards, clipped value loss, approximate KL, KL control.

The clipped policy loss is :func:`lightning_rl.algorithms.losses.clipped_surrogate` with per-token
advantages; with the value loss and an entropy bonus it makes PPO's eq. 9 (Schulman et al. 2017,
arXiv:1707.06347). The KL penalty in the rewards and its adaptive coefficient follow Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593; the clipped value loss
is OpenAI baselines' (it is not in the PPO paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_rl.algorithms.losses import kl_k1, kl_k3

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate: ``k1 = p - r`` (unbiased) or ``k3`` (always >= 0)."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last real token of each right-padded row (-1 for an empty row)."""
    return mask.long().sum(-1) - 1


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every real token, plus the sequence score on its last one.

    Args:
        scores: ``[B]`` reward of each whole completion (reward functions or a reward model).
        kl: ``[B, T]`` per-token KL estimate to the reference (zeros when there is no penalty).
        mask: ``[B, T]`` right-padded mask of real tokens.
        kl_coef: KL penalty coefficient (>= 0).

    Returns:
        ``[B, T]`` float32 rewards, 0 on padding; a row without real tokens gets nothing.
    """
    m = mask.float()
    rewards = -kl_coef * kl.float() * m
    last = last_token_index(mask)
    rows = (last >= 0).nonzero().flatten()
    rewards[rows, last[rows]] += scores.float().to(rewards.device)[rows]
    return rewards


@dataclass
class ValueLossTerms:
    """Per-token clipped value loss and where the clipped branch was the larger one."""

    loss: torch.Tensor
    clipped: torch.Tensor


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    cliprange_value: float | None = 0.2,
) -> ValueLossTerms:
    """Per-token ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.

    Args:
        values: ``[B, T]`` current value estimates (with grad).
        old_values: ``[B, T]`` values at rollout time (no grad).
        returns: ``[B, T]`` GAE returns (targets).
        cliprange_value: ``c``; ``None`` gives the plain squared error.
    """
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        return ValueLossTerms(0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool))
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (v_clip - returns) ** 2
    return ValueLossTerms(0.5 * torch.maximum(unclipped, clipped), clipped > unclipped)


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Per-token ``0.5 * (logp - old_logp)^2``: how far the updates moved the policy."""
    return 0.5 * (logp - old_logp) ** 2


class AdaptiveKLController:
    """KL coefficient that tracks a target KL (Ziegler et al., 2019); fixed when ``target`` is None.

    After each rollout, ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

    Args:
        init_kl_coef: starting coefficient (>= 0).
        target: wanted KL per sequence (summed over its tokens); None keeps the coefficient fixed.
        horizon: number of sequences over which the coefficient adapts.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        if init_kl_coef < 0 or not math.isfinite(init_kl_coef):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {init_kl_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"kl_target must be > 0 (or None for a fixed coefficient), got {target}")
        if target is not None and init_kl_coef == 0:
            raise ValueError("an adaptive KL coefficient cannot start at 0 (it scales multiplicatively); set kl_coef")
        if horizon < 1:
            raise ValueError(f"kl_horizon must be >= 1, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    @property
    def adaptive(self) -> bool:
        """Whether the coefficient changes."""
        return self.target is not None

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the target after ``n_steps`` sequences with mean KL ``current_kl``."""
        if self.target is not None and math.isfinite(current_kl):
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The coefficient and its settings (for checkpoints)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])
