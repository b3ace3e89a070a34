"""Padding and end-of-sequence helpers shared by the rollout engines."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad token id lists into ``(ids [N, P], mask [N, P])`` long tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad token id lists into ``(ids [N, C], mask [N, C])``; ``C`` is at least 1."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def completion_mask_and_reasons(
    completion_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, list[str]]:
    """Mask of tokens up to and including the first EOS, and ``"stop"``/``"length"`` per row."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), device=completion_ids.device))
    has_eos = is_eos.any(-1)
    width = completion_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, width, dtype=torch.long))
    positions = torch.arange(width, device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]) & (positions[None, :] < width)
    reasons = ["stop" if e else "length" for e in has_eos.tolist()]
    return mask.long(), reasons
