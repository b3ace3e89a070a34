"""The padding layout a rollout must have before the update reads it."""

from __future__ import annotations

import torch

from lightning_rl.algorithms.gae import not_right_padded
from lightning_rl.rollout.engine import Rollout

_HOST_LENGTHS = "_lightning_rl_host_lengths"


def check_rollout_layout(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a rollout whose prompts are not left-padded or whose completions are not right-padded.

    The update predicts each completion's first token from the prompt's last column, so a right-padded prompt would
    be scored from a pad token without an error. The built-in engines lay rollouts out this way; a rollout a user's
    engine or callback made is checked here (one read of the device per step, none for a rollout in host memory).

    Returns:
        Each row's prompt and completion lengths ``([N], [N])`` in host memory, from the same read: with them the
        packed forwards lay out their micro-batches without reading the device (:func:`attach_host_lengths`).

    Raises:
        ValueError: naming the rows and the layout expected.
    """
    prompt_bad = not_right_padded(rollout.prompt_mask.flip(-1))  # left-padded: right-padded when read backwards
    completion_bad = not_right_padded(rollout.completion_mask)
    n = rollout.num_sequences
    flags = torch.stack([prompt_bad.any(), completion_bad.any()]).long()
    lengths = torch.stack([rollout.prompt_mask.sum(-1), rollout.completion_mask.sum(-1)]).long().flatten()
    host = torch.cat([flags, lengths]).cpu()  # one read of the device
    if not host[:2].any():
        return host[2 : 2 + n], host[2 + n :]
    if prompt_bad.any():
        rows = prompt_bad.nonzero().flatten().tolist()
        raise ValueError(f"the rollout's prompts in rows {rows[:8]} are not left-padded (a 0 of prompt_mask follows a "
                         "1): Rollout.prompt_ids must end each prompt at the last column, with padding before it "
                         "(lightning_rl.rollout.padding.left_pad lays rows out so)")
    rows = completion_bad.nonzero().flatten().tolist()
    raise ValueError(f"the rollout's completions in rows {rows[:8]} are not right-padded (a 1 of completion_mask "
                     "follows a 0): Rollout.completion_ids must start each completion at the first column, with "
                     "padding after it")


def attach_host_lengths(rollout: Rollout, lengths: tuple[torch.Tensor, torch.Tensor]) -> Rollout:
    """Keep ``lengths`` (from :func:`check_rollout_layout`) with ``rollout`` itself, for :func:`rows_host_lengths`.

    Kept on this object only: a copy (``Rollout.to``, a process's share of the rows) has none, and its forwards
    read the lengths from the device as before.
    """
    setattr(rollout, _HOST_LENGTHS, lengths)
    return rollout


def rows_host_lengths(rollout: Rollout, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The host lengths of ``rollout``'s ``rows`` (a slice, or indices in host memory), or None where there are none.

    Indices on a device would have to be read back first, so they get None too (PPO's shuffled mini-batches).
    """
    lengths = getattr(rollout, _HOST_LENGTHS, None)
    if lengths is None or (isinstance(rows, torch.Tensor) and rows.device.type != "cpu"):
        return None
    return lengths[0][rows], lengths[1][rows]


__all__ = ["attach_host_lengths", "check_rollout_layout", "rows_host_lengths"]
