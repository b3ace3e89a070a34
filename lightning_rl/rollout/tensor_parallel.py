"""A tensor-parallel group generates its members' prompts together, and each member keeps its own completions.

The engines of a group hold shards of one model, so they must see identical inputs: every member's prompts are
gathered (in rank order), the group generates once, and each member takes back the rows of its own prompts. The
pure parts (:func:`flatten_group`, :func:`own_rows`, :func:`take_rows`) are separate from the one collective
(:func:`gather_group_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, TypeVar

import torch

from lightning_rl.rollout.engine import Rollout

T = TypeVar("T")


def flatten_group(per_member: Sequence[Sequence[T]]) -> tuple[list[T], list[int]]:
    """The group's prompts in member order, and how many each member gave."""
    return [p for member in per_member for p in member], [len(member) for member in per_member]


def own_rows(counts: Sequence[int], member: int, num_generations: int) -> slice:
    """Rows of the group's rollout (``num_generations`` per prompt, prompt by prompt) that answer ``member``'s prompts.

    Raises:
        ValueError: ``member`` is not in the group.
    """
    if not 0 <= member < len(counts):
        raise ValueError(f"member {member} is not in a group of {len(counts)}")
    start = sum(counts[:member])
    return slice(start * num_generations, (start + counts[member]) * num_generations)


def take_rows(rollout: Rollout, rows: slice) -> Rollout:
    """The rows ``rows`` of ``rollout``, their ``group_index`` renumbered from 0 (the member's own prompts)."""
    kw: dict[str, Any] = {}
    for f in fields(rollout):
        v = getattr(rollout, f.name)
        kw[f.name] = v[rows] if isinstance(v, torch.Tensor | list) else v
    index = kw["group_index"]
    if index.numel():
        kw["group_index"] = index - index.min()
    return replace(rollout, **kw)


def gather_group_prompts(prompt_ids: list[list[int]], group: Any) -> tuple[list[list[int]], list[int]]:
    """Every member's prompt token ids, in member order (a collective over ``group``), and their counts."""
    per_member: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(per_member, [list(p) for p in prompt_ids], group=group)
    return flatten_group(per_member)


__all__ = ["flatten_group", "gather_group_prompts", "own_rows", "take_rows"]
