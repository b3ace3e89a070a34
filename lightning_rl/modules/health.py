"""Per-step checks that an RL run still learns: its completions get rewards, and the policy has not collapsed."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_rl.rewards.validation import RewardError, unscored_functions

log = logging.getLogger(__name__)

COLLAPSE_ENTROPY = 0.05  # nats per token
COLLAPSE_LENGTH = 1.5  # tokens per completion (an empty reply is its EOS token alone)


def collapse_message(entropy: float | None, completion_length: float | None) -> str | None:
    """Why a step looks collapsed (near-zero entropy and near-empty completions), or None."""
    if entropy is None or completion_length is None or math.isnan(entropy) or math.isnan(completion_length):
        return None
    if entropy < COLLAPSE_ENTROPY and completion_length <= COLLAPSE_LENGTH:
        return (f"the policy looks collapsed: entropy {entropy:.3g} nats per token and {completion_length:.2g} tokens "
                "per completion (empty replies). Usually the learning rate is too high or the weights blew up: "
                "lower learning_rate, keep max_grad_norm set, and resume from an earlier checkpoint")
    return None


class RunHealth:
    """Warns, step by step, about reward functions that scored nothing, pairs that all tie, steps that train nothing
    (no reward differs within a group, every completion masked out), and a collapsed policy.

    Args:
        max_unscored_steps: training steps in a row in which no completion got a reward (or, for
            online DPO, no pair of completions got different rewards) before training stops with
            :class:`~lightning_rl.rewards.RewardError` (0 never stops).
    """

    def __init__(self, max_unscored_steps: int = 3) -> None:
        self.max_unscored_steps = max_unscored_steps
        self.unscored_streak = 0
        self.tie_streak = 0
        self.flat_streak = 0  # steps in a row in which no group's rewards differed (GRPO)
        self.masked_streak = 0  # steps in a row in which every completion was truncated and masked out

    def check_rewards(self, total: torch.Tensor, per_fn: torch.Tensor, names: Sequence[str], step: int) -> None:
        """Warn for each function that scored none of this step's completions; raise after too many empty steps."""
        n = int(total.shape[0])
        silent = unscored_functions(per_fn, names)
        for name in silent:
            log.warning("reward function %r returned None/NaN for all %d completions at step %d: it gave no "
                        "reward (check the columns it reads and what it returns)", name, n, step)
        if n and bool(torch.isnan(total).all()):
            self.unscored_streak += 1
            if self.max_unscored_steps and self.unscored_streak >= self.max_unscored_steps:
                raise RewardError(
                    f"no completion got a reward for {self.unscored_streak} steps in a row ({n} completions at step "
                    f"{step}; reward functions returning None/NaN for all of them: {silent}), so nothing was learned. "
                    "Fix the reward functions (a None means 'does not apply'), or raise max_unscored_steps "
                    "(0 never stops)"
                )
        else:
            self.unscored_streak = 0

    def check_pairs(self, valid: int, pairs: int, names: Sequence[str], step: int) -> None:
        """Warn when no pair of a batch has a winner (every pair tied or was unscored); raise after too many in a row.

        Such a batch trains nothing and takes no optimizer step, so ``global_step`` (and ``max_steps``) stands still.
        """
        if not pairs or valid:
            self.tie_streak = 0
            return
        self.tie_streak += 1
        log.warning("step %d: reward functions %s gave both completions of all %d prompts the same reward (or "
                    "None/NaN), so there was no pair to train on and no optimizer step was taken (%d such batches in "
                    "a row)", step, list(names), pairs, self.tie_streak)
        if self.max_unscored_steps and self.tie_streak >= self.max_unscored_steps:
            raise RewardError(
                f"for {self.tie_streak} batches in a row, reward functions {list(names)} gave both completions of "
                f"every prompt the same reward (or None/NaN), so online DPO had no pair to train on, took no optimizer "
                f"step and global_step stayed at {step} (max_steps would never end the run). Use a denser reward "
                "(partial credit rather than 0/1, or a tie-breaking term), a higher sampling temperature, or more "
                "prompts per batch; or raise max_unscored_steps (0 never stops)"
            )

    def check_signal(self, values: dict[str, Any], step: int, masks_truncated: bool = False) -> None:
        """Warn when steps in a row can train nothing, though their rewards were scored.

        Two cases: no group of completions got different rewards (``frac_reward_zero_std`` 1: every GRPO advantage
        is 0), or every completion hit ``max_new_tokens`` and ``mask_truncated_completions`` left it out of the
        loss. A warning after ``max(3, max_unscored_steps)`` such steps in a row, and every ten times as many after.
        """
        flat = values.get("frac_reward_zero_std")
        self.flat_streak = self.flat_streak + 1 if flat is not None and flat >= 1.0 else 0
        if self._due(self.flat_streak):
            log.warning("step %d: for %d steps in a row every group of completions got the same reward, so every "
                        "advantage was 0 and nothing was learned. Use a denser reward (partial credit rather than "
                        "0/1), a higher sampling temperature or more num_generations", step, self.flat_streak)
        truncated = values.get("truncated_frac")
        masked = masks_truncated and truncated is not None and truncated >= 1.0
        self.masked_streak = self.masked_streak + 1 if masked else 0
        if self._due(self.masked_streak):
            log.warning("step %d: for %d steps in a row every completion reached max_new_tokens and "
                        "mask_truncated_completions=True left it out of the loss, so nothing was learned. Raise "
                        "sampling.max_new_tokens or set mask_truncated_completions=False", step, self.masked_streak)

    def _due(self, streak: int) -> bool:
        """Whether a streak of ``streak`` steps gets its warning now (at the threshold, then every 10x as many)."""
        after = max(3, self.max_unscored_steps)
        return streak == after or (streak > after and streak % (10 * after) == 0)

    def check_collapse(self, values: dict[str, Any], step: int) -> None:
        """Warn when a step's ``entropy`` and ``completion_length`` are both near zero."""
        message = collapse_message(values.get("entropy"), values.get("completion_length"))
        if message:
            log.warning("step %d: %s", step, message)

    def state_dict(self) -> dict[str, int]:
        """The streaks of steps without rewards and of batches without a pair (for a resumed run)."""
        return {"unscored_streak": self.unscored_streak, "tie_streak": self.tie_streak,
                "flat_streak": self.flat_streak, "masked_streak": self.masked_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the streaks."""
        self.unscored_streak = int(state.get("unscored_streak", 0))
        self.tie_streak = int(state.get("tie_streak", 0))
        self.flat_streak = int(state.get("flat_streak", 0))
        self.masked_streak = int(state.get("masked_streak", 0))
