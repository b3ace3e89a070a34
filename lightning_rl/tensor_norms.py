"""The L2 norms of many tensors at once: one fused norm per device and dtype, accumulated in fp32.

A LoRA policy has hundreds of small gradient tensors; one ``vector_norm`` each launched hundreds of kernels a step
(421 for SmolLM2 with r=16 adapters on every linear layer). ``torch._foreach_norm`` takes them a few kernels at a time.
"""

from __future__ import annotations

import torch


def tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 L2 norm of each of ``tensors``, as 0-dim tensors on their own devices (grouped by device and dtype,
    so not in the order given).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return [n for group in groups.values() for n in torch._foreach_norm(group, 2, dtype=torch.float32)]


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the squares of every element of ``tensors`` (at least one tensor), accumulated in fp32, on the
    first tensor's device.
    """
    device = tensors[0].device
    return torch.stack([n.to(device) for n in tensor_norms(tensors)]).square().sum()


__all__ = ["sum_of_squares", "tensor_norms"]
