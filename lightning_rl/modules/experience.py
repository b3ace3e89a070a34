"""What one on-policy training step works on: the rollout and everything computed from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_rl.modules.step_stats import StepStats
from lightning_rl.rollout.engine import Rollout

Rows = slice | torch.Tensor  # the completions of a mini- or micro-batch: a range, or indices (shuffled)


@dataclass
class Experience:
    """One training step of an :class:`~lightning_rl.modules.on_policy.OnPolicyModule`, filled in step by step.

    Attributes:
        prompts: the batch's prompts (one per group of ``num_generations`` completions).
        rollout: the sampled completions (on the module's device).
        rewards: ``[N]`` total reward of each completion, on the CPU (NaN where no function applies).
        rewards_per_function: ``[N, F]`` the reward of each function (NaN where it returned None).
        completions: the completion texts.
        mask: ``[N, C]`` float, 1 on the tokens that count in the loss.
        micro_batch_size: completions per forward/backward in this step.
        old_logp: ``[N, C]`` log-probs of the completions under the policy before the update (no grad), or
            None when each update is the first on its rows (then the forward's own detached log-probs serve).
        ref_logp: ``[N, C]`` log-probs under the reference policy, or None without a KL term.
        values: ``[N, C]`` value estimates at rollout time (methods with a critic), else None.
        returns: ``[N, C]`` targets of the value function, else None.
        kl: ``[N, C]`` per-token KL to the reference that shaped the rewards, else None.
        advantages: ``[N]`` per completion or ``[N, C]`` per token (set by ``compute_advantages``).
        iteration: the pass over the rollout that is running (0 first).
        stats: the step's statistics, as device tensors.
    """

    prompts: Sequence[Any]
    rollout: Rollout
    rewards: torch.Tensor
    rewards_per_function: torch.Tensor
    completions: list[str]
    mask: torch.Tensor
    micro_batch_size: int
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    iteration: int = 0
    stats: StepStats = field(default_factory=StepStats)

    @property
    def num_completions(self) -> int:
        """``N``, the completions of the step."""
        return self.rollout.num_sequences


@dataclass
class PolicyOutput:
    """One forward of the policy on a micro-batch: ``[m, C]`` token log-probs, entropy and (PPO) values."""

    logp: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None = None


def sub_rows(rows: Rows, start: int, stop: int) -> Rows:
    """Rows ``start:stop`` (relative) of ``rows``."""
    if isinstance(rows, slice):
        return slice(rows.start + start, min(rows.start + stop, rows.stop))
    return rows[start:stop]


def row_count(rows: Rows) -> int:
    """How many completions ``rows`` holds."""
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.shape[0])
