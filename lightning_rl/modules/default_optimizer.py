"""The modules' default optimizer: AdamW, with PyTorch's fused CUDA kernel where Lightning and the parameters allow."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
from torch import nn


def fused_adamw_applies(params: Iterable[nn.Parameter], precision_plugin: Precision | None = None) -> bool:
    """Whether AdamW's fused kernel steps ``params``: plain floating-point CUDA tensors, outside AMP and FSDP.

    The fused kernel steps a group in one launch per dtype, where the default (``foreach``) AdamW launches about ten
    kernels per group and keeps a temporary copy of the second moments (``sqrt(v)``) during the step; TRL's default
    optimizer is the fused one too. PyTorch's default stays for parameters elsewhere or sharded (FSDP2's
    ``DTensor``), under Lightning's ``MixedPrecision`` (``precision="bf16-mixed"``/``"16-mixed"``, which refuses to
    clip the gradients of an optimizer that unscales them itself, as the fused one does) and under FSDP's plugins.
    """
    if isinstance(precision_plugin, MixedPrecision | FSDPPrecision):
        return False
    params = list(params)
    return bool(params) and all(
        p.device.type == "cuda" and p.is_floating_point() and not hasattr(p, "placements") for p in params
    )


def default_adamw(
    groups: Sequence[Mapping[str, Any]], lr: float, weight_decay: float, precision_plugin: Precision | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups`` at ``lr`` and ``weight_decay``; fused when :func:`fused_adamw_applies`."""
    fused = fused_adamw_applies((p for g in groups for p in g["params"]), precision_plugin)
    return torch.optim.AdamW([dict(g) for g in groups], lr=lr, weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


__all__ = ["default_adamw", "fused_adamw_applies"]
