"""Checks on what reward functions return and on the learning signal their rewards give."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable."""


def short_repr(x: Any, n: int = 120) -> str:
    """``repr(x)`` cut to ``n`` characters."""
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def reward_values(values: Any, name: str, n: int) -> list[float | None]:
    """The ``n`` rewards a function named ``name`` returned, as floats (None kept), or a :class:`RewardError`."""
    fix = "it must return one float (or None) per completion, as a list"
    if (values is None or isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable)
            or getattr(values, "ndim", 1) != 1):
        got = "None" if values is None else f"{type(values).__name__} {short_repr(values)}"
        raise RewardError(f"reward function {name!r} returned {got} for {n} completions; {fix}")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions; {fix}")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError):
            raise RewardError(f"reward function {name!r} returned {short_repr(v)} for sample {i}; "
                              "expected a float or None") from None
    return out


def unscored_functions(per_fn: torch.Tensor, names: Sequence[str]) -> list[str]:
    """Names of the functions that scored none of the completions (None or NaN for every one)."""
    if not per_fn.shape[0]:
        return []
    return [name for j, name in enumerate(names) if bool(torch.isnan(per_fn[:, j]).all())]


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of the groups of ``group_size`` completions whose rewards are all equal: they give no signal.

    NaN rewards (no function applies) are left out; a group with fewer than two rewards left counts
    as giving no signal.
    """
    groups = rewards.detach().float().view(-1, group_size)
    finite = ~torch.isnan(groups)
    count = finite.sum(-1)
    filled = torch.where(finite, groups, torch.zeros_like(groups))
    mean = filled.sum(-1) / count.clamp(min=1)
    spread = torch.where(finite, (groups - mean[:, None]).abs(), torch.zeros_like(groups)).amax(-1)
    flat = (count < 2) | torch.isclose(spread, torch.zeros_like(spread), atol=1e-8)
    return flat.float().mean().item() if flat.numel() else math.nan
