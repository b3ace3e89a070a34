"""What one training step generated and how it was scored: the rows of the sample-completion tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepSamples:
    """Equal-length columns, one row per completion (GRPO, PPO) or per pair / labelled row (DPO, ORPO, KTO).

    Modules set one of these as ``last_samples`` in each training step; callbacks turn the first
    rows into tables. Tensor columns stay tensors until :meth:`head` is called, so recording costs
    nothing on the steps whose samples nobody writes.

    Attributes:
        columns: column name -> values (a list, or a 1-D tensor); the order is the table's.
        group_size: consecutive rows that share a prompt (``num_generations`` for GRPO / PPO).
    """

    columns: Mapping[str, Sequence[Any] | torch.Tensor]
    group_size: int = 1

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def head(self, groups: int) -> list[dict[str, Any]]:
        """The rows of the first ``groups`` groups as dicts of plain Python values."""
        n = min(len(self), max(groups, 0) * self.group_size)
        cols = {k: (v[:n].detach().float().cpu().tolist() if isinstance(v, torch.Tensor) else list(v[:n]))
                for k, v in self.columns.items()}
        return [{k: cols[k][i] for k in cols} for i in range(n)]


def per_completion(prompts: Sequence[Any], group_size: int) -> list[Any]:
    """Each prompt repeated for the ``group_size`` completions sampled from it."""
    return [p for p in prompts for _ in range(group_size)]
