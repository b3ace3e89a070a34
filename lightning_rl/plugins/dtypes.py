"""The dtype a Trainer computes in, read off its precision plugin (for sizing and dtype choices elsewhere)."""

from __future__ import annotations

from typing import Any

import torch

_BY_PRECISION = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
}


def trainer_compute_dtype(trainer: Any) -> torch.dtype | None:
    """The 16-bit dtype the trainer's matrix products run in, or None for full precision (or no trainer).

    Reads the precision plugin's ``compute_dtype`` when it has one
    (:class:`~lightning_rl.plugins.MemoryAwarePrecision`), else Lightning's precision string
    (``"bf16-mixed"``, ``"16-true"``, ...).
    """
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    dtype = getattr(plugin, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return _BY_PRECISION.get(str(getattr(trainer, "precision", "")))


__all__ = ["trainer_compute_dtype"]
