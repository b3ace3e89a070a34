"""A parameter's gradient handed over one use at a time, where autograd would hold the parts until it has them all.

Autograd sums a parameter's gradient over its uses before it hands the sum to the parameter (``AccumulateGrad``),
and holds the parts that arrived meanwhile. A tied LM head and input embedding is used at both ends of the model:
the head's part, the first of the backward, waits for the embedding's, the last. That is a ``[vocab, hidden]``
tensor held through every layer's backward (about 0.27 GiB in bf16 for a Qwen2.5-0.5B shape, 54 MiB for
SmolLM2-135M).

Where a parameter's gradient leaves the device anyway (:class:`~lightning_rl.plugins.host_gradients.HostGradients`
sends it to host memory), the part can leave at once: the owner sets a sink on the parameter
(:func:`set_gradient_sink`), and the code that uses the weight wraps that use in :func:`handed_off`. The backward
then gives the use's part to the sink and nothing to autograd; the sink adds the parts up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_SINK = "_lightning_rl_gradient_sink"

GradientSink = Callable[[torch.Tensor], None]


class _HandOff(torch.autograd.Function):
    """The identity on ``weight``; its backward gives ``weight``'s gradient from this use to ``sink``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, sink: GradientSink) -> torch.Tensor:
        ctx.sink = sink
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        ctx.sink(grad)
        return None, None


def set_gradient_sink(param: torch.Tensor, sink: GradientSink | None) -> None:
    """Give ``param``'s gradient from each :func:`handed_off` use to ``sink`` (None: to autograd again)."""
    if sink is None:
        if hasattr(param, _SINK):
            delattr(param, _SINK)
    else:
        setattr(param, _SINK, sink)


def gradient_sink(param: torch.Tensor) -> GradientSink | None:
    """The sink :func:`set_gradient_sink` set on ``param`` (None when there is none)."""
    return getattr(param, _SINK, None)


def handed_off(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` for one use whose gradient goes to the weight's sink as soon as the backward makes it.

    Without a sink, without gradients, or for a weight that needs none, ``weight`` itself.
    """
    sink = gradient_sink(weight)
    if sink is None or not weight.requires_grad or not torch.is_grad_enabled():
        return weight
    return _HandOff.apply(weight, sink)


__all__ = ["GradientSink", "gradient_sink", "handed_off", "set_gradient_sink"]
