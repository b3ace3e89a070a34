"""Optimizer states kept in (pinned) CPU memory and streamed to the device chunk by chunk for the step.

Between steps the per-parameter state tensors of an optimizer (AdamW's two moments, SGD's momentum
buffer) live in CPU memory. :meth:`StreamedOptimizerStates.step` steps the parameters in chunks whose
states total at most ``chunk_bytes``: it brings one chunk's states to the device, runs the optimizer
for those parameters only, sends the states back and frees those parameters' gradients, then moves
on. Only one chunk of states (and the optimizer's temporaries for it) is on the device at a time.

The optimizer runs for a subset of its parameters by hiding the other parameters' gradients:
``torch.optim`` optimizers skip parameters whose ``.grad`` is None. The update of each parameter is
element-wise and depends only on its own state, gradient and group settings, so the result is
bit-identical to one plain ``optimizer.step()``. Optimizers with a state shared by all parameters
(LBFGS) cannot be split this way and are refused.

With :attr:`StreamedOptimizerStates.masters` set, the fp32 masters of the weights that
:class:`~lightning_rl.plugins.host_masters.HostMasterWeights` keeps in host memory travel with their
chunk's states: the optimizer steps the master, and the parameter gets the result in its own dtype.

Zero-dimensional state tensors (Adam's ``step`` counters) are never moved: they stay where the
optimizer puts them (a CPU scalar, or a device scalar with ``capturable``/``fused``).

The optimizer's ``step`` runs once per chunk, so step hooks registered on it
(``register_step_pre_hook``/``register_step_post_hook``) run once per chunk too; LR schedulers
are stepped by the caller, once per optimizer step, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_rl.plugins.host_masters import HostMasterWeights

MiB = 1024**2
_UNSUPPORTED = ("LBFGS",)
_DEFAULT_STATE_RATIO = 2.0  # AdamW: two moments in the parameter's dtype


class UnsupportedOptimizerError(TypeError):
    """An optimizer whose step cannot be split into per-parameter chunks."""


def _error(optimizer: Optimizer, why: str) -> UnsupportedOptimizerError:
    return UnsupportedOptimizerError(
        "MemoryAwarePrecision(optimizer_states='cpu') steps the parameters in chunks, which "
        f"{type(optimizer).__name__} does not allow: {why}. Use optimizer_states='device' with this optimizer, "
        "or an optimizer whose state is per parameter (AdamW, Adam, SGD, ...)."
    )


def check_streamable(optimizer: Optimizer) -> None:
    """Raise :class:`UnsupportedOptimizerError` when ``optimizer`` cannot be stepped chunk by chunk."""
    if not isinstance(optimizer, Optimizer):
        raise _error(optimizer, "it is not a torch.optim.Optimizer")
    if type(optimizer).__name__ in _UNSUPPORTED or isinstance(optimizer, torch.optim.LBFGS):
        raise _error(optimizer, "its state is one global history over all parameters and its step re-evaluates "
                                "the closure")
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(k) not in params for k in optimizer.state):
        raise _error(optimizer, "it keeps state that does not belong to one parameter")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_streamed(value: Any) -> bool:
    """State tensors that move: all but the zero-dimensional ones (step counters)."""
    return torch.is_tensor(value) and value.dim() > 0


class StreamedOptimizerStates:
    """Keeps optimizers' per-parameter states in CPU memory and steps them on the device chunk by chunk.

    Args:
        chunk_bytes: at most this many bytes of states on the device at once (a parameter whose states
            alone are larger makes a chunk of its own).
        pin_memory: keep the CPU copies in pinned (page-locked) memory for fast asynchronous copies
            (only used for states of CUDA parameters).
        free_grads: set each parameter's ``.grad`` to None right after its chunk has stepped.
    """

    def __init__(self, chunk_bytes: int = 64 * MiB, pin_memory: bool = True, free_grads: bool = True) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.pin_memory = pin_memory
        self.free_grads = free_grads
        self.storage = torch.device("cpu")
        # (id(parameter), state key) -> (CPU buffer, device the optimizer keeps that tensor on); the buffers
        # are reused from step to step (and after a checkpoint load, whose new states have the same shapes)
        self._slots: dict[tuple[int, Any], tuple[torch.Tensor, torch.device]] = {}
        self.last_chunks = 0
        self.last_peak_chunk_bytes = 0
        self.masters: HostMasterWeights | None = None  # fp32 masters in host memory, streamed with the states

    def _param_bytes(self, p: nn.Parameter) -> int:
        """Bytes of the tensor the optimizer steps for ``p``: its fp32 master when that lives in host memory."""
        if self.masters is not None and self.masters.manages(p):
            return p.numel() * 4
        return _tensor_bytes(p)

    # ----------------------------------------------------------------------------- moving
    def _store(self, p: nn.Parameter, state: dict[str, Any], key: Any, value: torch.Tensor) -> int:
        """Copy one device tensor into its CPU buffer and put the buffer into the state."""
        slot = (id(p), key)
        entry = self._slots.get(slot)
        buf = None if entry is None else entry[0]
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            pin = self.pin_memory and value.is_cuda
            buf = torch.empty(value.shape, dtype=value.dtype, device=self.storage, pin_memory=pin)
        buf.copy_(value, non_blocking=buf.is_pinned())
        self._slots[slot] = (buf, value.device)
        state[key] = buf
        return _tensor_bytes(value)

    def _streamed(
        self, optimizer: Optimizer, params: Iterable[nn.Parameter], in_storage: bool
    ) -> Iterator[tuple[nn.Parameter, dict[str, Any], Any, torch.Tensor]]:
        """``(param, state, key, tensor)`` of the streamed state tensors that are (or are not) in CPU storage."""
        for p in params:
            for key, value in list((optimizer.state.get(p) or {}).items()):
                if _is_streamed(value) and (value.device == self.storage) == in_storage:
                    yield p, optimizer.state[p], key, value

    def offload_states(self, optimizer: Optimizer, params: Iterable[nn.Parameter] | None = None) -> int:
        """Move the states of ``params`` (all the optimizer's by default) that are off the CPU to it. Returns bytes."""
        keys = list(optimizer.state.keys()) if params is None else params
        return sum(self._store(p, state, key, value) for p, state, key, value in self._streamed(optimizer, keys, False))

    def _load_states(self, optimizer: Optimizer, params: Sequence[nn.Parameter]) -> int:
        """Bring the states of ``params`` to the devices the optimizer keeps them on. Returns bytes."""
        moved = 0
        for p, state, key, value in self._streamed(optimizer, params, True):
            entry = self._slots.get((id(p), key))
            home = p.device if entry is None or entry[0] is not value else entry[1]
            if home == self.storage:
                continue
            state[key] = value.to(home, non_blocking=value.is_pinned())
            moved += _tensor_bytes(value)
        return moved

    def return_states(self, optimizer: Optimizer) -> int:
        """Bring all of ``optimizer``'s streamed states back to the devices it keeps them on, for good. Returns bytes.

        For a caller that stops streaming: the copies are complete when it returns, so the CPU buffers may go.
        """
        moved = self._load_states(optimizer, list(optimizer.state.keys()))
        if moved and torch.cuda.is_available():
            torch.cuda.synchronize()
        return moved

    def states_on_device_bytes(self, optimizers: Iterable[Optimizer]) -> int:
        """Bytes of streamed state tensors that are not in CPU memory now."""
        total = 0
        for opt in optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if _is_streamed(v) and v.device != self.storage:
                        total += _tensor_bytes(v)
        return total

    # ----------------------------------------------------------------------------- chunking
    @staticmethod
    def _state_bytes(optimizer: Optimizer, p: nn.Parameter) -> int | None:
        state = optimizer.state.get(p)
        if not state:
            return None
        return sum(_tensor_bytes(v) for v in state.values() if _is_streamed(v))

    def _ratio(self, optimizer: Optimizer) -> float:
        """State bytes per parameter byte, from a parameter that has states (2 for AdamW before any)."""
        for g in optimizer.param_groups:
            for p in g["params"]:
                nbytes = self._state_bytes(optimizer, p)
                if nbytes is not None and p.numel():
                    return nbytes / self._param_bytes(p)
        return _DEFAULT_STATE_RATIO

    def chunks(self, optimizer: Optimizer, params: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
        """Split ``params`` (in order) into chunks of at most ``chunk_bytes`` of states (estimated before any)."""
        ratio = self._ratio(optimizer)
        out: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in params:
            known = self._state_bytes(optimizer, p)
            nbytes = int(ratio * self._param_bytes(p)) if known is None else known
            if current and size + nbytes > self.chunk_bytes:
                out.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            out.append(current)
        return out

    # ----------------------------------------------------------------------------- the step
    def step(self, optimizer: Optimizer, step_fn: Callable[[], Any] | None = None) -> None:
        """Step every parameter of ``optimizer`` that has a gradient, one chunk of states at a time.

        Args:
            optimizer: a ``torch.optim`` optimizer with per-parameter state.
            step_fn: runs one optimizer step over the parameters whose gradients are visible
                (default ``optimizer.step()``); it must not run a closure (backward is done before).
        """
        check_streamable(optimizer)
        run = step_fn or optimizer.step
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.offload_states(optimizer)  # states a checkpoint load or a device move left on the device
        grads = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        chunks = self.chunks(optimizer, params)
        cuda = any(p.is_cuda for p in params)
        done: set[int] = set()
        peak = 0
        try:
            for chunk in chunks:
                for p in chunk:
                    p.grad = grads[p]
                if self.masters is not None:
                    self.masters.swap_in(chunk)  # the optimizer steps the fp32 masters
                self._load_states(optimizer, chunk)
                run()
                if not done:
                    check_streamable(optimizer)  # the first chunk's step created no global state
                peak = max(peak, sum(self._state_bytes(optimizer, p) or 0 for p in chunk))
                self.offload_states(optimizer, chunk)
                if self.masters is not None:
                    self.masters.swap_out(chunk)
                for p in chunk:
                    done.add(id(p))
                    if self.free_grads:
                        p.grad = None
        finally:
            if self.masters is not None:  # an error mid-chunk: those weights and masters stay as they were
                self.masters.swap_out(self.masters.swapped(), keep=False)
                self.masters.grad_scale = None
            for p, g in grads.items():  # an error mid-way: the unstepped parameters get their gradients back
                if id(p) not in done or not self.free_grads:
                    p.grad = g
            if cuda:
                torch.cuda.synchronize()  # the CPU copies are complete before anyone reads or reuses them
        self.last_chunks = len(chunks)
        self.last_peak_chunk_bytes = peak

    def device_bytes_estimate(self, optimizer: Optimizer, total_state_bytes: int) -> int:
        """Planned device bytes of states during a streamed step: one chunk, or the largest parameter's states."""
        ratio = self._ratio(optimizer)
        largest = 0
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.requires_grad:
                    known = self._state_bytes(optimizer, p)
                    largest = max(largest, int(ratio * self._param_bytes(p)) if known is None else known)
        states = min(total_state_bytes, max(self.chunk_bytes, largest))
        if self.masters is not None and len(self.masters):
            return 2 * states  # a chunk's fp32 masters and fp32 gradients: as many bytes as AdamW's two moments
        return states

    def clear(self) -> None:
        """Forget the buffer bookkeeping (the optimizers keep their CPU states)."""
        self._slots.clear()


__all__ = ["StreamedOptimizerStates", "UnsupportedOptimizerError", "check_streamable"]
