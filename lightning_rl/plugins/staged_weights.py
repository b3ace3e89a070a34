"""Stepped weights that wait in host memory for the next weight sync instead of reaching the device at once.

When a policy's compute-dtype weights are the rollout engine's own memory
(:mod:`~lightning_rl.rollout.shared_trained_weights`), the optimizer step must not write them: the engine process
generates the next rollout from them while the update runs. With staging on,
:class:`~lightning_rl.plugins.host_masters.HostMasterWeights` writes each stepped weight, rounded to its parameter's
dtype, into a (pinned) host buffer of the parameter's shape instead, and :meth:`StagedWeights.flush` copies the
waiting ones into the parameters once the engine is idle (the weight sync): 2 bytes per parameter across PCIe, as
the step would have sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StagedWeights:
    """One host buffer per parameter for its stepped values, and which of them wait to be copied in.

    Args:
        params: the parameters whose stepped values wait here.
        pin_memory: pin the buffers of CUDA parameters (asynchronous copies both ways).
    """

    def __init__(self, params: Sequence[nn.Parameter], pin_memory: bool = True) -> None:
        self._params = {id(p): p for p in params}
        self._buffers = {}
        with torch.no_grad():  # each buffer starts as its parameter: rows a failed step left unwritten stay right
            for p in params:
                buf = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin_memory and p.is_cuda)
                self._buffers[id(p)] = buf.copy_(p.data)
        self._waiting: set[int] = set()

    def holds(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s stepped values wait here."""
        return id(p) in self._params

    def buffer(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s host buffer."""
        return self._buffers[id(p)]

    @property
    def waiting(self) -> list[nn.Parameter]:
        """The parameters whose stepped values have not been copied in yet."""
        return [self._params[i] for i in self._waiting]

    def write(self, p: torch.Tensor, values: torch.Tensor, rows: slice | None = None) -> None:
        """Round ``values`` (``p``'s stepped fp32 values, or rows ``rows`` of them) into ``p``'s buffer.

        From a device tensor the copy is asynchronous (into pinned memory) and rounds on the device; the caller
        synchronizes before the buffer is read (the streamed step does at its end).
        """
        buf = self._buffers[id(p)]
        dst = buf if rows is None else buf[rows]
        with torch.no_grad():
            if values.is_cuda:
                dst.copy_(values.to(dst.dtype), non_blocking=dst.is_pinned())
            else:
                dst.copy_(values)
        self._waiting.add(id(p))

    def flush(self) -> int:
        """Copy every waiting buffer into its parameter's storage and wait for the copies. Returns the bytes copied."""
        moved = 0
        cuda = False
        with torch.no_grad():
            for i in list(self._waiting):
                p, buf = self._params[i], self._buffers[i]
                p.data.copy_(buf, non_blocking=buf.is_pinned())
                moved += buf.numel() * buf.element_size()
                cuda = cuda or p.is_cuda
        if cuda:
            torch.cuda.synchronize()
        self._waiting.clear()
        return moved


__all__ = ["StagedWeights"]
