"""Reward functions ``f(prompts, completions, **columns) -> list[float | None]`` and their combination."""

from lightning_rl.rewards.builtin import (
    LengthPenalty,
    NumericMatch,
    RegexFormat,
    extract_number,
    numeric_match,
)
from lightning_rl.rewards.reward_model import RewardModel
from lightning_rl.rewards.reward_set import RewardError, RewardSet

__all__ = [
    "LengthPenalty",
    "NumericMatch",
    "RegexFormat",
    "RewardModel",
    "RewardError",
    "RewardSet",
    "extract_number",
    "numeric_match",
]
