"""Move optimizer states (and gradients) to pinned CPU memory while the rollout engine is awake, and back.

The copies are exact (``Tensor.copy_`` keeps every bit), the original tensors' devices are
remembered, and the pinned CPU buffers are reused from one rollout to the next.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim import Optimizer


@dataclass
class _Moved:
    container: dict | None  # optimizer state dict of one parameter; None for a gradient
    key: object  # state key, or the parameter for a gradient
    device: torch.device


class OptimizerOffloader:
    """Offloads optimizer states and gradients from ``source`` devices to ``target`` and restores them.

    Args:
        target: where the tensors go (``cpu``).
        pin_memory: use pinned (page-locked) CPU buffers for fast, asynchronous copies (CUDA only).
        include_grads: move the parameters' ``.grad`` too.
    """

    def __init__(self, target: str | torch.device = "cpu", pin_memory: bool = True, include_grads: bool = True) -> None:
        self.target = torch.device(target)
        self.pin_memory = pin_memory
        self.include_grads = include_grads
        self._moved: list[_Moved] = []
        self._buffers: dict[tuple[int, object], torch.Tensor] = {}
        self._grads_aside: dict[int, torch.Tensor] = {}
        self.offloaded_bytes = 0

    @property
    def is_offloaded(self) -> bool:
        """Whether tensors are away from their device now."""
        return bool(self._moved)

    def _buffer(self, slot: tuple[int, object], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = self.pin_memory and self.target.type == "cpu" and t.is_cuda
            buf = torch.empty(t.shape, dtype=t.dtype, device=self.target, pin_memory=pin)
            self._buffers[slot] = buf
        return buf

    def offload(self, optimizers: Iterable[Optimizer], source: str | torch.device | None = None) -> int:
        """Move the optimizers' state tensors (and gradients) found on ``source`` to the target.

        Args:
            optimizers: the optimizers whose state moves.
            source: device type to move from (``cuda``); None: every tensor not already on the target.

        Returns:
            Bytes moved.
        """
        if self._moved:
            raise RuntimeError("optimizer states are already offloaded; call restore() first")
        src = None if source is None else torch.device(source).type

        def wanted(t: torch.Tensor) -> bool:
            if src is None:
                return t.device != self.target
            return t.device.type == src and t.numel() > 0

        moved = 0
        any_cuda = False
        for opt in optimizers:
            for p, state in opt.state.items():
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and wanted(value):
                        buf = self._buffer((id(state), key), value)
                        buf.copy_(value, non_blocking=buf.is_pinned())
                        any_cuda |= value.is_cuda
                        state[key] = buf
                        self._moved.append(_Moved(state, key, value.device))
                        moved += value.numel() * value.element_size()
                if self.include_grads and p.grad is not None and wanted(p.grad):
                    g = p.grad
                    buf = self._buffer((id(p), "grad"), g)
                    buf.copy_(g, non_blocking=buf.is_pinned())
                    any_cuda |= g.is_cuda
                    self._moved.append(_Moved(None, p, g.device))
                    p.grad = None  # a grad must live on its parameter's device: kept aside, put back on restore
                    self._grads_aside[id(p)] = buf
                    moved += g.numel() * g.element_size()
        if any_cuda:
            torch.cuda.synchronize()  # the copies are done before the device memory is reused elsewhere
            torch.cuda.empty_cache()
        self.offloaded_bytes = moved
        return moved

    def restore(self) -> int:
        """Put every offloaded tensor back on its device (bit-identical). Returns bytes moved."""
        moved = 0
        any_cuda = False
        aside = self._grads_aside
        for m in self._moved:
            if m.container is None:
                p = m.key
                buf = aside.pop(id(p))
                p.grad = buf.to(m.device, non_blocking=buf.is_pinned(), copy=True)
                t = p.grad
            else:
                buf = m.container[m.key]
                t = buf.to(m.device, non_blocking=buf.is_pinned(), copy=True)
                m.container[m.key] = t
            any_cuda |= t.is_cuda
            moved += t.numel() * t.element_size()
        if any_cuda:
            torch.cuda.synchronize()  # the pinned buffers may be overwritten at the next offload
        self._moved.clear()
        return moved

    def release_buffers(self) -> None:
        """Free the cached CPU buffers (after a restore)."""
        if not self._moved:
            self._buffers.clear()


__all__ = ["OptimizerOffloader"]
