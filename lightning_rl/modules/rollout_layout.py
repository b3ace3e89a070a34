"""The padding layout a rollout must have before the update reads it."""

from __future__ import annotations

import torch

from lightning_rl.algorithms.gae import not_right_padded
from lightning_rl.rollout.engine import Rollout


def check_rollout_layout(rollout: Rollout) -> None:
    """Refuse a rollout whose prompts are not left-padded or whose completions are not right-padded.

    The update predicts each completion's first token from the prompt's last column, so a right-padded prompt would
    be scored from a pad token without an error. The built-in engines lay rollouts out this way; a rollout a user's
    engine or callback made is checked here (one read of the device per step).

    Raises:
        ValueError: naming the rows and the layout expected.
    """
    prompt_bad = not_right_padded(rollout.prompt_mask.flip(-1))  # left-padded: right-padded when read backwards
    completion_bad = not_right_padded(rollout.completion_mask)
    if not torch.stack([prompt_bad.any(), completion_bad.any()]).any().item():  # one read of the device
        return
    if prompt_bad.any():
        rows = prompt_bad.nonzero().flatten().tolist()
        raise ValueError(f"the rollout's prompts in rows {rows[:8]} are not left-padded (a 0 of prompt_mask follows a "
                         "1): Rollout.prompt_ids must end each prompt at the last column, with padding before it "
                         "(lightning_rl.rollout.padding.left_pad lays rows out so)")
    rows = completion_bad.nonzero().flatten().tolist()
    raise ValueError(f"the rollout's completions in rows {rows[:8]} are not right-padded (a 1 of completion_mask "
                     "follows a 0): Rollout.completion_ids must start each completion at the first column, with "
                     "padding after it")


__all__ = ["check_rollout_layout"]
