"""Gradients of host-master weights sent to pinned host memory as the backward produces them.

With fp32 masters in host memory (:mod:`~lightning_rl.plugins.host_masters`) the optimizer step streams each
chunk's masters and states through the device. The gradients were the one full set of tensors left on the device
between the backward and the step, and they set the backward's peak: at its end every layer's gradient is there
beside the first layer's recomputed activations. :class:`HostGradients` copies each managed parameter's gradient
into a pinned host buffer as soon as autograd has accumulated it (a post-accumulate-grad hook) and frees it on the
device; :class:`~lightning_rl.plugins.streamed_states.StreamedOptimizerStates` brings each chunk's gradients back
with its states. The squared norm of each gradient is taken on the device before it leaves, so gradient clipping
and the NaN check read no host memory.

The parameters may be bf16 weights whose fp32 masters stream with the states, or fp32 parameters themselves whose
optimizer states stream (:class:`~lightning_rl.plugins.precision.MemoryAwarePrecision` beside a rollout engine
process with masters too large to move). A clipped step scales the latter's gradients by :attr:`grad_scale` as they
come back (the masters' upcast gradients take their own factor).

All copies run on the backward's CUDA stream, so they are ordered with the kernels that produce and reuse the
memory; the host never reads the buffers. A second micro-batch of the same optimizer step brings the first one's
gradient back and adds it before the sum leaves again.

A watched parameter used in several places (a tied LM head and input embedding) need not wait for autograd's sum:
each use wrapped in :func:`~lightning_rl.early_gradients.handed_off` (a tied LM head's, in
:func:`~lightning_rl.logprobs.head_weight_for_kernel`) sends its part to a host buffer of its own as the backward
makes it. The part comes back to be added when autograd hands over the other uses' sum, before any earlier
micro-batch's: the additions autograd would have made, in its order. A part that no other use joins by the end of
the backward leaves alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_rl.early_gradients import set_gradient_sink


class HostGradients:
    """Pinned host buffers holding the gradients of some parameters between the backward and the optimizer step.

    Args:
        pin_memory: page-locked buffers (asynchronous copies); only used for CUDA parameters.
    """

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory
        self._buffers: dict[int, torch.Tensor] = {}
        self._held: dict[int, nn.Parameter] = {}
        self._squares: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._watched: set[int] = set()
        self._sinks: list[nn.Parameter] = []  # parameters whose handed-off uses send their parts here
        self._parts: dict[int, nn.Parameter] = {}  # parameters with a handed-off part waiting in _part_buffers
        self._part_buffers: dict[int, torch.Tensor] = {}
        self.grad_scale: torch.Tensor | None = None  # the clipping factor of the coming step (None: unclipped)

    def attach(self, params: Iterable[nn.Parameter]) -> int:
        """Send the gradients of ``params`` to host memory from the next backward on. Returns how many."""
        n = 0
        for p in params:
            if id(p) in self._watched or not p.requires_grad:
                continue
            self._watched.add(id(p))
            self._handles.append(p.register_post_accumulate_grad_hook(self._leave))
            set_gradient_sink(p, functools.partial(self._take_part, p))
            self._sinks.append(p)
            n += 1
        return n

    def detach(self) -> None:
        """Stop moving gradients; a gradient still held goes back to its parameter (on its device)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._sinks:
            set_gradient_sink(p, None)
        self._sinks.clear()
        for p in list(self._held.values()):
            p.grad = self.take(p, p.device)
        for p in self._parts.values():  # none outside a backward; kept as gradients if there were
            self._part_into_grad(p, non_blocking=False)
        self._parts.clear()
        self._part_buffers.clear()
        self._watched.clear()
        self._buffers.clear()

    def _buffer(self, p: nn.Parameter, grad: torch.Tensor, buffers: dict[int, torch.Tensor] | None = None,
                ) -> torch.Tensor:
        buffers = self._buffers if buffers is None else buffers
        buf = buffers.get(id(p))
        if buf is None or buf.shape != grad.shape or buf.dtype != grad.dtype:
            buf = torch.empty(grad.shape, dtype=grad.dtype, device="cpu", pin_memory=self.pin_memory and grad.is_cuda)
            buffers[id(p)] = buf
        return buf

    @torch.no_grad()
    def _leave(self, p: nn.Parameter) -> None:
        grad = p.grad
        if grad is None or grad.is_sparse:
            return
        if self._parts.pop(id(p), None) is not None:
            part = self._part_buffers[id(p)]  # a handed-off use's part of this backward: autograd adds it first
            grad.add_(part.to(grad.device, non_blocking=part.is_pinned()))
        buf = self._buffer(p, grad)
        if id(p) in self._held:  # an earlier micro-batch of this step left already: add it back first
            grad.add_(buf.to(grad.device, non_blocking=buf.is_pinned()))
        self._squares[id(p)] = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        buf.copy_(grad, non_blocking=buf.is_pinned())
        self._held[id(p)] = p
        p.grad = None  # the device memory goes back to the allocator, reused after the copy on this stream

    @torch.no_grad()
    def _take_part(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """One use's part of ``p``'s gradient, handed off before autograd has the others: to host memory now.

        Called in the backward; it waits there for the sum of ``p``'s other uses (:meth:`_leave`), or for the
        backward's end (:meth:`_settle`).
        """
        grad = grad.detach()
        if id(p) in self._parts:  # a second handed-off use: the parts add in the order they came
            earlier = self._part_buffers[id(p)]
            grad = earlier.to(grad.device, non_blocking=earlier.is_pinned(), copy=True).add_(grad)
        buf = self._buffer(p, grad, self._part_buffers)
        buf.copy_(grad, non_blocking=buf.is_pinned())
        self._parts[id(p)] = p
        # at this backward's end (a second call finds nothing left; a backward that fails leaves no flag behind)
        torch.autograd.Variable._execution_engine.queue_callback(self._settle)

    @torch.no_grad()
    def _settle(self) -> None:
        """The backward's end: a handed-off part that no other use of its parameter joined leaves alone."""
        for key, p in list(self._parts.items()):
            del self._parts[key]  # taken here: _leave must not add it a second time
            self._part_into_grad(p, non_blocking=self._part_buffers[key].is_pinned())
            self._leave(p)

    def _part_into_grad(self, p: nn.Parameter, non_blocking: bool) -> None:
        """Add the handed-off part waiting for ``p`` (a device copy of it) into ``p.grad``, or make it the gradient."""
        back = self._part_buffers[id(p)].to(p.device, non_blocking=non_blocking, copy=True)
        p.grad = back if p.grad is None else p.grad.add_(back)

    # ----------------------------------------------------------------------------- the step
    def watches(self, p: nn.Parameter) -> bool:
        """Whether the backward sends ``p``'s gradient to host memory."""
        return id(p) in self._watched

    def device_bytes(self, params: Iterable[nn.Parameter]) -> int:
        """Planned device bytes of the gradients of ``params``.

        Those not watched count whole; of the watched ones, two at most are on the device at once (the one the
        backward just produced and, with several micro-batches, the earlier sum that comes back to be added to it).
        """
        kept, sent = 0, [0, 0]
        for p in params:
            if not p.requires_grad:
                continue
            nbytes = p.numel() * p.element_size()
            if self.watches(p):
                sent = sorted([*sent, nbytes])[-2:]
            else:
                kept += nbytes
        return kept + sum(sent)

    def holds(self, p: nn.Parameter) -> bool:
        """Whether ``p``'s gradient waits in host memory."""
        return id(p) in self._held

    def held(self) -> list[nn.Parameter]:
        """The parameters whose gradients wait in host memory."""
        return list(self._held.values())

    def squares(self) -> torch.Tensor | None:
        """The sum of the held gradients' squared L2 norms (fp32, on their device); None when none is held."""
        if not self._squares:
            return None
        return torch.stack(list(self._squares.values())).sum()

    def host_gradient(self, p: nn.Parameter) -> torch.Tensor:
        """The host buffer of ``p``'s held gradient (read by copies on the device's stream, not by the host)."""
        return self._buffers[id(p)]

    def take(self, p: nn.Parameter, device: torch.device) -> torch.Tensor:
        """``p``'s held gradient copied to ``device``; it is no longer held."""
        buf = self._buffers[id(p)]
        self.release(p)
        return buf.to(device, non_blocking=buf.is_pinned())

    def release(self, p: nn.Parameter) -> None:
        """Forget ``p``'s held gradient (it has been stepped, or the step was skipped)."""
        self._held.pop(id(p), None)
        self._squares.pop(id(p), None)

    def drop(self) -> None:
        """Forget every held gradient and any handed-off part a failed backward left (a skipped step: ``zero_grad``)."""
        self._held.clear()
        self._squares.clear()
        self._parts.clear()
        self.grad_scale = None

    def scaled(self, grad: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A held gradient brought to its device times :attr:`grad_scale` when the step is clipped.

        ``grad`` is the copy from the host buffer ``source`` (on a CPU, ``source`` itself), which is never changed.
        """
        if self.grad_scale is None:
            return grad
        factor = self.grad_scale.to(grad.device)
        return grad * factor if grad is source else grad.mul_(factor)

    def __len__(self) -> int:
        return len(self._watched)


__all__ = ["HostGradients"]
