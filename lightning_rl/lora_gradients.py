"""LoRA's parameter gradients without its forward, for a layer whose weight already holds the adapter's product.

When a linear layer's weight is merged (``W + s * B @ A``), the adapter path adds nothing the forward needs; only
the gradients of ``A`` and ``B`` do: ``dB = s * dy^T (x A^T)`` and ``dA = s * (dy B)^T x``. :class:`AdapterGradients`
is an identity on the layer's output whose backward computes them from the saved input and the output's gradient,
which it passes through unchanged: the input's gradient comes through the merged weight (``W_m^T dy``). No
``[tokens, out_features]`` adapter output is ever computed, in the forward or a checkpoint's recomputation.
"""

from __future__ import annotations

from typing import Any

import torch


class AdapterGradients(torch.autograd.Function):
    """``out`` unchanged; the backward adds LoRA's ``A`` and ``B`` gradients (see the module docstring).

    Args (of ``apply``):
        out: the layer's output ``[..., out_features]``.
        x: the layer's input ``[..., in_features]`` (the adapter's input: no dropout).
        a: ``lora_A`` weight ``[r, in_features]``.
        b: ``lora_B`` weight ``[out_features, r]``.
        scale: the adapter's scaling.

    The gradients are computed in the forward's autocast dtype when autocast was on (as peft's adapter matmuls
    are), else in the promoted dtype of ``x`` and ``a``, and returned in each weight's dtype.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Save the input and the adapter weights; return ``out`` as it is."""
        device = x.device.type
        ctx.scale = float(scale)
        ctx.dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else torch.promote_types(x.dtype, a.dtype))
        ctx.save_for_backward(x, a, b)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``grad`` passed through, and the gradients of ``a`` and ``b``."""
        x, a, b = ctx.saved_tensors
        dtype = ctx.dtype
        dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
        h = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_b = (dy.t() @ (h @ a.to(dtype).t())).mul_(ctx.scale)
        grad_a = ((dy @ b.to(dtype)).t() @ h).mul_(ctx.scale)
        return grad, None, grad_a.to(a.dtype), grad_b.to(b.dtype), None


__all__ = ["AdapterGradients"]
