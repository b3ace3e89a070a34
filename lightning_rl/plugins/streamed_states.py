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

With ``split_large=True`` a parameter whose states alone exceed one chunk (an embedding of a large vocabulary)
is stepped in row slices of about one chunk each, for the element-wise optimizers Adam, AdamW and SGD: each
slice sees the parameter's own step counter and its rows of the states, so the result is bit-identical to one
step of the whole parameter, and the device holds one slice's states and temporaries instead of the whole
parameter's. On by default in :class:`~lightning_rl.plugins.MemoryAwarePrecision` (``split_large_parameters``).

With ``overlap_copies=True`` (CUDA only) the copies run on two side streams of their own: while chunk i steps
on the current stream, chunk i+1's states (and masters) come in on one stream and chunk i-1's go out on the
other, so the two directions of PCIe and the step overlap instead of waiting for each other. Up to three chunks
are on the device at once instead of one. The destination tensors come from the current stream's pool (the
copy streams wait for it before writing), and those that leave are marked as used by the outgoing stream, so
the allocator reuses no memory a copy still reads. Off by default (it costs up to two more chunks of memory).

With ``host_step=True``, the weights whose fp32 masters, states and gradients all wait in host memory (host masters
with :class:`~lightning_rl.plugins.host_gradients.HostGradients`) step on the CPU instead of through the device
(:class:`~lightning_rl.plugins.host_step.HostStep`, Adam and AdamW): only their rounded weights cross PCIe. The
CPU steps them on a thread of its own while the other parameters stream as above. With a share in (0, 1) instead
(``host_step=0.5``), that share of those weights' elements steps on the CPU and the rest streams through the device
at the same time: the CPU's memory bandwidth and the PCIe link each carry part of the step. ``host_step="auto"``
starts at half and moves the share after each step toward the two sides ending together
(:func:`~lightning_rl.plugins.host_step.balanced_share`), so it follows the host's CPU and link.

The optimizer's ``step`` runs once per chunk, so step hooks registered on it
(``register_step_pre_hook``/``register_step_post_hook``) run once per chunk too; LR schedulers
are stepped by the caller, once per optimizer step, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_rl.cuda_streams import side_stream
from lightning_rl.plugins.host_step import (
    AUTO_SHARE_START,
    HostStep,
    balanced_share,
    chunks_by_size,
    host_share,
    host_step_refusal,
    host_step_setting,
)

if TYPE_CHECKING:
    from lightning_rl.plugins.host_gradients import HostGradients
    from lightning_rl.plugins.host_masters import HostMasterWeights

log = logging.getLogger(__name__)
MiB = 1024**2
_UNSUPPORTED = ("LBFGS",)
_DEFAULT_STATE_RATIO = 2.0  # AdamW: two moments in the parameter's dtype
# optimizers whose step is element-wise given the parameter's step counters, so that row slices step alike
_SLICEABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class UnsupportedOptimizerError(TypeError):
    """An optimizer whose step cannot be split into per-parameter chunks."""


def _error(optimizer: Optimizer, why: str) -> UnsupportedOptimizerError:
    return UnsupportedOptimizerError(
        "MemoryAwarePrecision(optimizer_states='cpu') steps the parameters in chunks, which "
        f"{type(optimizer).__name__} does not allow: {why}. Use optimizer_states='device' with this optimizer, "
        "or an optimizer whose state is per parameter (AdamW, Adam, SGD, ...)."
    )


#: torch's optimizers whose step of a parameter reads that parameter's gradient and state alone: stepped chunk by
#: chunk they give what one step of all gives. Another optimizer may couple parameters (a global gradient norm,
#: decay of parameters without a gradient), which chunks would change.
PER_PARAMETER_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "ASGD", "Rprop", "Adafactor")
    if hasattr(torch.optim, name))


def steps_per_parameter(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is one of :data:`PER_PARAMETER_OPTIMIZERS` (not a subclass: it may step otherwise)."""
    return type(optimizer) in PER_PARAMETER_OPTIMIZERS


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


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: a gradient held in (pinned) host memory comes over asynchronously on the current stream."""
    return t if t.device == device else t.to(device, non_blocking=t.is_pinned())


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_streamed(value: Any) -> bool:
    """State tensors that move: all but the zero-dimensional ones (step counters)."""
    return torch.is_tensor(value) and value.dim() > 0


@dataclass
class _Prefetched:
    """One chunk's states and masters copied to the device on the incoming stream, and the event that ends it."""

    states: list[tuple[nn.Parameter, Any, torch.Tensor]] = field(default_factory=list)
    masters: dict[int, torch.Tensor] = field(default_factory=dict)  # id(parameter) -> device copy of its master
    done: torch.cuda.Event | None = None
    device: torch.device | None = None


class StreamedOptimizerStates:
    """Keeps optimizers' per-parameter states in CPU memory and steps them on the device chunk by chunk.

    Args:
        chunk_bytes: at most this many bytes of states on the device at once (a parameter whose states
            alone are larger makes a chunk of its own).
        pin_memory: keep the CPU copies in pinned (page-locked) memory for fast asynchronous copies
            (only used for states of CUDA parameters).
        free_grads: set each parameter's ``.grad`` to None right after its chunk has stepped.
        split_large: step a parameter whose states exceed ``chunk_bytes`` in row slices (Adam, AdamW, SGD).
        overlap_copies: on CUDA, bring the next chunk in and the last one out on side streams while a chunk steps.
        host_step: step the weights whose masters and gradients wait in host memory on the CPU (Adam, AdamW):
            True for all of them, a float in (0, 1) for that share of their elements (the rest stream meanwhile),
            ``"auto"`` for a share that each step moves toward both sides ending together (:attr:`host_share`).
    """

    def __init__(
        self,
        chunk_bytes: int = 64 * MiB,
        pin_memory: bool = True,
        free_grads: bool = True,
        split_large: bool = False,
        overlap_copies: bool = False,
        host_step: bool | float | str = False,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.pin_memory = pin_memory
        self.free_grads = free_grads
        self.split_large = split_large
        self.overlap_copies = overlap_copies
        self.host_step = host_step_setting(host_step, "StreamedOptimizerStates(host_step=...)")
        self.host_share = AUTO_SHARE_START  # with host_step="auto": the CPU's share, balanced after every step
        self._host_scratch: torch.Tensor | None = None  # the host step's fp32 gradients, kept from step to step
        self._copy_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self.storage = torch.device("cpu")
        # (id(parameter), state key) -> (CPU buffer, device the optimizer keeps that tensor on); the buffers
        # are reused from step to step (and after a checkpoint load, whose new states have the same shapes)
        self._slots: dict[tuple[int, Any], tuple[torch.Tensor, torch.device]] = {}
        self.last_chunks = 0
        self.last_peak_chunk_bytes = 0
        self.last_step_seconds = 0.0  # the last step's wall time, its device work included on CUDA
        self.masters: HostMasterWeights | None = None  # fp32 masters in host memory, streamed with the states
        self.gradients: HostGradients | None = None  # gradients the backward sent to host memory

    def _param_bytes(self, p: nn.Parameter) -> int:
        """Bytes of the tensor the optimizer steps for ``p``: its fp32 master when that lives in host memory."""
        if self.masters is not None and self.masters.manages(p):
            return p.numel() * 4
        return _tensor_bytes(p)

    # ----------------------------------------------------------------------------- moving
    def _store(self, p: nn.Parameter, state: dict[str, Any], key: Any, value: torch.Tensor,
               home: torch.device | None = None) -> int:
        """Copy one tensor into its CPU buffer (pinned when it is kept on CUDA) and put the buffer into the state.

        ``home``: the device the optimizer keeps the state on, where each step brings it; default ``value``'s.
        """
        home = value.device if home is None else home
        slot = (id(p), key)
        entry = self._slots.get(slot)
        buf = None if entry is None else entry[0]
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            pin = self.pin_memory and home.type == "cuda"
            buf = torch.empty(value.shape, dtype=value.dtype, device=self.storage, pin_memory=pin)
        buf.copy_(value, non_blocking=buf.is_pinned())
        self._slots[slot] = (buf, home)
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

    def keep_loaded_states(self, optimizer: Optimizer) -> int:
        """Take the states a checkpoint load left in ``optimizer``: those on a device to their CPU buffers, those in
        host memory into pinned buffers where their parameter is on CUDA (their copies are asynchronous then).

        Returns the bytes moved off a device.
        """
        moved = self.offload_states(optimizer)
        for p, state, key, value in self._streamed(optimizer, list(optimizer.state.keys()), True):
            entry = self._slots.get((id(p), key))
            if self.pin_memory and p.is_cuda and not value.is_pinned() and (entry is None or entry[0] is not value):
                self._store(p, state, key, value, home=p.device)
        return moved

    def _home(self, p: nn.Parameter, key: Any, value: torch.Tensor) -> torch.device:
        """Where the optimizer keeps ``p``'s state ``key``: where it was when this buffer took it, else on ``p``."""
        entry = self._slots.get((id(p), key))
        return p.device if entry is None or entry[0] is not value else entry[1]

    def _load_states(self, optimizer: Optimizer, params: Sequence[nn.Parameter]) -> int:
        """Bring the states of ``params`` to the devices the optimizer keeps them on. Returns bytes."""
        moved = 0
        for p, state, key, value in self._streamed(optimizer, params, True):
            home = self._home(p, key, value)
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

    def _estimated_state_bytes(self, optimizer: Optimizer, p: nn.Parameter, ratio: float) -> int:
        """Bytes of ``p``'s states: as they are, or ``ratio`` times its bytes before it has any."""
        known = self._state_bytes(optimizer, p)
        return int(ratio * self._param_bytes(p)) if known is None else known

    def _sliceable(self, optimizer: Optimizer, p: nn.Parameter) -> bool:
        """Whether ``p`` may step in row slices (``split_large`` and an element-wise optimizer)."""
        return self.split_large and type(optimizer) in _SLICEABLE and p.dim() > 0 and p.shape[0] > 1

    def _manages(self, p: nn.Parameter) -> bool:
        return self.masters is not None and self.masters.manages(p)

    def chunks(self, optimizer: Optimizer, params: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
        """Split ``params`` (in order) into chunks of at most ``chunk_bytes`` of states (estimated before any)."""
        ratio = self._ratio(optimizer)
        return chunks_by_size(params, self.chunk_bytes, lambda p: self._estimated_state_bytes(optimizer, p, ratio))

    # ----------------------------------------------------------------------------- the step
    def step(self, optimizer: Optimizer, step_fn: Callable[[], Any] | None = None) -> None:
        """Step every parameter of ``optimizer`` that has a gradient, one chunk of states at a time.

        Args:
            optimizer: a ``torch.optim`` optimizer with per-parameter state.
            step_fn: runs one optimizer step over the parameters whose gradients are visible
                (default ``optimizer.step()``); it must not run a closure (backward is done before).
        """
        check_streamable(optimizer)
        started = time.perf_counter()
        run = step_fn or optimizer.step
        held = self.gradients
        params = [p for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None or (held is not None and held.holds(p))]
        self.offload_states(optimizer)  # states a checkpoint load or a device move left on the device
        # a gradient the backward sent to host memory stays there until its chunk comes (its host buffer here)
        grads = {p: held.host_gradient(p) if p.grad is None else p.grad for p in params}  # type: ignore[union-attr]
        from_host = {id(p) for p in params if p.grad is None}
        for p in params:
            p.grad = None
        on_host = self._stepped_on_host(optimizer, params, from_host)
        cuda = any(p.is_cuda for p in params)
        params = [p for p in params if id(p) not in on_host]
        chunks = self.chunks(optimizer, params)
        done: set[int] = set()
        peak = 0
        rows: dict[int, int] = {}  # chunk index -> rows per slice (0: stepped whole), decided when first needed

        def rows_of(i: int) -> int:
            if i not in rows:
                rows[i] = self._slice_rows(optimizer, chunks[i], grads)
            return rows[i]

        streams = self._streams_for(params) if self.overlap_copies and cuda else None
        ahead: dict[int, _Prefetched] = {}
        host: HostStep | None = None
        host_error: BaseException | None = None
        streamed: tuple[int, float] | None = None  # (elements, seconds) of the streamed side, for host_step="auto"
        failed = False
        try:
            if on_host:  # on a thread of its own while the other chunks stream through the device
                host = HostStep(optimizer, [p for p in grads if id(p) in on_host], self.masters,  # type: ignore[arg-type]
                                held, scratch=self._host_scratch)  # type: ignore[arg-type]
                host.start(background=bool(chunks))
            streaming = time.perf_counter()
            for i, chunk in enumerate(chunks):
                if rows_of(i):
                    peak = max(peak, self._step_in_slices(optimizer, chunk[0], grads[chunk[0]], run, rows_of(i),
                                                          id(chunk[0]) in from_host))
                    done.add(id(chunk[0]))
                    if held is not None:
                        held.release(chunk[0])
                    if self.free_grads:
                        grads[chunk[0]] = None
                    continue
                loaded = None
                if streams is not None:
                    loaded = ahead.pop(i, None) or self._prefetch(optimizer, chunk, grads, streams[0])
                    if i + 1 < len(chunks) and not rows_of(i + 1):  # the next chunk comes in while this one steps
                        ahead[i + 1] = self._prefetch(optimizer, chunks[i + 1], grads, streams[0])
                for p in chunk:
                    p.grad = self._gradient_back(p, grads[p], id(p) in from_host)
                if loaded is not None:
                    self._install(optimizer, loaded)
                if self.masters is not None:  # the optimizer steps the fp32 masters
                    self.masters.swap_in(chunk, loaded=None if loaded is None else loaded.masters)
                if loaded is None:
                    self._load_states(optimizer, chunk)
                run()
                if not done:
                    check_streamable(optimizer)  # the first chunk's step created no global state
                peak = max(peak, sum(self._state_bytes(optimizer, p) or 0 for p in chunk))
                if streams is not None:
                    self._send_back(optimizer, chunk, streams[1])
                else:
                    self.offload_states(optimizer, chunk)
                    if self.masters is not None:
                        self.masters.swap_out(chunk)
                for p in chunk:
                    done.add(id(p))
                    if held is not None:
                        held.release(p)
                    if self.free_grads:
                        p.grad = None
                        grads[p] = None  # its memory goes now, not at the end of the step
            if host is not None and not chunks:
                run()  # the step's hooks run once, as for a streamed chunk; no gradient shows, nothing steps
            if host is not None and chunks and self.host_step == "auto":
                if cuda:
                    torch.cuda.synchronize()  # the streamed side's time includes its device work
                streamed = (sum(p.numel() for p in params), time.perf_counter() - streaming)
        except BaseException:
            failed = True
            raise
        finally:
            if host is not None:  # its stepped gradients are released here, the unstepped ones still held
                host_error = host.finish()
                self._host_scratch = host.scratch
            if self.masters is not None:  # an error mid-chunk: those weights and masters stay as they were
                self.masters.swap_out(self.masters.swapped(), keep=False)
                self.masters.grad_scale = None
            if held is not None:
                held.grad_scale = None
            for p, g in grads.items():  # an error mid-way: the unstepped parameters get their gradients back
                if g is None or (id(p) in done and self.free_grads):
                    continue
                if id(p) in on_host and not held.holds(p):  # type: ignore[union-attr]
                    continue  # stepped on the host (its buffer carried the new weights)
                if held is not None and held.holds(p):
                    p.grad = None  # it still waits in host memory, for a retry
                else:
                    p.grad = g
            if cuda:
                torch.cuda.synchronize()  # the CPU copies are complete before anyone reads or reuses them
            if host_error is not None and failed:
                log.error("the host step failed beside a failed streamed step: %r", host_error)
        if host_error is not None:
            raise host_error
        if host is not None and streamed is not None:
            self.host_share = balanced_share(self.host_share, (sum(p.numel() for p in host.params), host.seconds),
                                             streamed)
        self.last_chunks = len(chunks)
        self.last_peak_chunk_bytes = peak
        self.last_step_seconds = time.perf_counter() - started  # after the final synchronize on CUDA

    def _steps_on_host(self, optimizer: Optimizer) -> bool:
        """Whether host masters whose gradients wait in host memory step on the CPU (``host_step``, Adam/AdamW)."""
        return (self.host_step and self.masters is not None and self.gradients is not None
                and host_step_refusal(optimizer) is None)

    def _stepped_on_host(
        self, optimizer: Optimizer, params: Sequence[nn.Parameter], from_host: set[int]
    ) -> set[int]:
        """``id`` of the parameters that step on the CPU: host masters whose gradients wait in host memory, all of
        them or ``host_step``'s share (:func:`~lightning_rl.plugins.host_step.host_share`).
        """
        if not self._steps_on_host(optimizer):
            return set()
        return host_share([p for p in params if self._manages(p) and id(p) in from_host], self._share())

    def _share(self) -> float:
        """The CPU's share of the host masters' elements in the coming step."""
        return self.host_share if self.host_step == "auto" else float(self.host_step)

    # ----------------------------------------------------------------------------- copies on side streams
    def _streams_for(self, params: Sequence[nn.Parameter]) -> tuple[torch.cuda.Stream, torch.cuda.Stream] | None:
        """The (incoming, outgoing) copy streams of the parameters' CUDA device; None when they span devices."""
        devices = {p.device for p in params}
        if len(devices) != 1:
            return None
        (device,) = devices
        if device not in self._copy_streams:
            self._copy_streams[device] = (side_stream(device, "states in"), side_stream(device, "states out"))
        return self._copy_streams[device]

    def _prefetch(
        self, optimizer: Optimizer, chunk: Sequence[nn.Parameter], grads: dict[nn.Parameter, Any],
        incoming: torch.cuda.Stream,
    ) -> _Prefetched:
        """Start copying ``chunk``'s CPU states (and host masters) to the device on ``incoming``.

        The destinations are allocated from the current stream's pool, and ``incoming`` waits for the current
        stream first, so nothing queued there still uses that memory when the copies write it.
        """
        out = _Prefetched()
        sources: list[torch.Tensor] = []
        for p, _, key, value in self._streamed(optimizer, chunk, True):
            home = self._home(p, key, value)
            if home == self.storage:
                continue
            out.states.append((p, key, torch.empty(value.shape, dtype=value.dtype, device=home)))
            sources.append(value)
        masters = [] if self.masters is None else [
            p for p in chunk if self.masters.manages(p) and grads.get(p) is not None]
        for p in masters:
            out.masters[id(p)] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        out.device = incoming.device
        incoming.wait_stream(torch.cuda.current_stream(incoming.device))
        with torch.cuda.stream(incoming):
            for (_, _, dst), src in zip(out.states, sources, strict=True):
                dst.record_stream(incoming)  # dropped unused (an error mid-step): freed once the copy is done
                dst.copy_(src, non_blocking=src.is_pinned())
            for p in masters:
                src, dst = self.masters.master(p), out.masters[id(p)]  # type: ignore[union-attr]
                dst.record_stream(incoming)
                dst.copy_(src, non_blocking=src.is_pinned())
            out.done = incoming.record_event()
        return out

    @staticmethod
    def _install(optimizer: Optimizer, loaded: _Prefetched) -> None:
        """Make the current stream wait for ``loaded``'s copies, and put its states into the optimizer."""
        if loaded.done is not None:
            torch.cuda.current_stream(loaded.device).wait_event(loaded.done)
        for p, key, dst in loaded.states:
            optimizer.state[p][key] = dst

    def _send_back(self, optimizer: Optimizer, chunk: Sequence[nn.Parameter], outgoing: torch.cuda.Stream) -> None:
        """Copy ``chunk``'s stepped states (and masters) to host memory on ``outgoing``, after the step.

        Each device tensor that leaves is marked as used by ``outgoing``, so its memory is reused only once the
        copy has read it.
        """
        device = outgoing.device
        outgoing.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(outgoing):
            for p, state, key, value in list(self._streamed(optimizer, chunk, False)):
                value.record_stream(outgoing)
                self._store(p, state, key, value)
            if self.masters is not None:
                ids = {id(p) for p in chunk}
                for p in self.masters.swapped():
                    if id(p) in ids:
                        p.data.record_stream(outgoing)  # the master's device copy, read by the copy below
                self.masters.swap_out(chunk)

    # ----------------------------------------------------------------------------- slices of one parameter
    def _slice_rows(self, optimizer: Optimizer, chunk: list[nn.Parameter], grads: dict[nn.Parameter, Any]) -> int:
        """Rows per slice when ``chunk`` is one parameter to step in slices (see ``split_large``), else 0."""
        if len(chunk) != 1 or not self._sliceable(optimizer, chunk[0]):
            return 0
        p = chunk[0]
        grad = grads.get(p)
        if grad is None or not p.is_contiguous() or not grad.is_contiguous() or grad.shape != p.shape:
            return 0
        state = optimizer.state.get(p) or {}
        if any(_is_streamed(v) and v.shape != p.shape for v in state.values()):
            return 0  # a state tensor of another shape: its rows are not the parameter's rows
        nbytes = self._estimated_state_bytes(optimizer, p, self._ratio(optimizer))
        if nbytes <= self.chunk_bytes:
            return 0
        if self._manages(p):  # a slice's fp32 master and fp32 gradient beside its states: AdamW's bytes again
            nbytes *= 2
        return max(1, int(p.shape[0] * self.chunk_bytes // nbytes))

    def _gradient_back(self, p: nn.Parameter, grad: torch.Tensor, from_host: bool) -> torch.Tensor:
        """``grad`` (or a slice of it) on ``p``'s device for the step.

        One that waited in host memory for a parameter without a host master takes the clipping factor here (a host
        master's takes it on its fp32 upcast).
        """
        out = _on(grad, p.device)
        if from_host and self.gradients is not None and not self._manages(p):
            out = self.gradients.scaled(out, grad)
        return out

    def _step_in_slices(
        self, optimizer: Optimizer, p: nn.Parameter, grad: torch.Tensor, run: Callable[[], Any], rows: int,
        from_host: bool = False,
    ) -> int:
        """Step ``p`` ``rows`` rows at a time, each slice with its rows of the states. Returns a slice's state bytes.

        Every slice starts from the parameter's step counters, or on its first step from no state, so the
        optimizer initialises each slice as it would the whole; the per-element states go back to their rows of
        the CPU buffers. On an error the parameter gets its gradient and its state back (rows already stepped
        stay stepped). A parameter whose fp32 master lives in host memory steps its master's rows (with the
        upcast gradient rows, times the clipping factor), which go back to the master and, rounded, to its rows (or to
        its host buffer's rows when staged).
        """
        data, home = p.data, p.device
        master = self.masters.master(p) if self._manages(p) else None
        before = dict(optimizer.state.get(p) or {})
        first = not before
        for k, v in list(before.items()):  # states a checkpoint load left on the device: to their CPU buffers
            if _is_streamed(v) and v.device != self.storage:
                self._store(p, before, k, v)
        scalars = {k: v for k, v in before.items() if not _is_streamed(v)}
        full = {k: v for k, v in before.items() if _is_streamed(v)}
        for k, v in full.items():  # loaded, or made by a host step: pinned, as the slices' copies are asynchronous
            if self.pin_memory and home.type == "cuda" and not v.is_pinned():
                full[k] = v.pin_memory()
        last: dict[Any, Any] = scalars
        peak = 0
        try:
            n = data.shape[0]  # p.shape is the slice's inside the loop
            for a in range(0, n, rows):
                b = min(n, a + rows)
                optimizer.state.pop(p, None)  # on the first step the optimizer initialises each slice
                if not first:
                    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
                    state.update({k: v[a:b].to(home, non_blocking=v.is_pinned()) for k, v in full.items()})
                    optimizer.state[p] = state
                if master is None:
                    p.data, p.grad = data[a:b], self._gradient_back(p, grad[a:b], from_host)
                else:
                    p.data = master[a:b].to(home, non_blocking=master.is_pinned())
                    p.grad = self.masters.fp32_gradient(_on(grad[a:b], home))  # type: ignore[union-attr]
                run()
                if master is not None:
                    self.masters.write_weight(p, data, p.data, rows=slice(a, b))  # type: ignore[union-attr]
                    with torch.no_grad():
                        master[a:b].copy_(p.data, non_blocking=master.is_pinned())
                after = optimizer.state[p]
                for k, v in after.items():
                    if not _is_streamed(v):
                        continue
                    if k not in full:  # the first step: one full-size CPU buffer per per-element state
                        pin = self.pin_memory and v.is_cuda
                        full[k] = torch.empty(data.shape, dtype=v.dtype, device=self.storage, pin_memory=pin)
                    full[k][a:b].copy_(v, non_blocking=full[k].is_pinned())
                last = {k: v for k, v in after.items() if not _is_streamed(v)}
                peak = max(peak, sum(_tensor_bytes(v) for v in after.values() if _is_streamed(v)))
        except BaseException:
            p.data, p.grad = data, (None if grad.device != home else grad)  # a host-held one stays held
            optimizer.state.pop(p, None)
            if before:
                optimizer.state[p] = before
            raise
        p.data = data
        p.grad = None if self.free_grads or grad.device != home else grad
        optimizer.state.pop(p, None)
        if last or full:  # (an optimizer that keeps no state, like SGD without momentum, gets no entry)
            optimizer.state[p] = {**last, **full}
        for k, v in full.items():
            self._slots[(id(p), k)] = (v, home)
        return peak

    def device_bytes_estimate(self, optimizer: Optimizer, total_state_bytes: int) -> int:
        """Planned device bytes of states during a step: a chunk, or the largest parameter's states (unless sliced).

        With ``overlap_copies``, two more chunks (of at most the second largest parameter's states) are in flight.
        With ``host_step=True``, the states of host masters whose gradients go to the host count for nothing (with a
        share, the chunks they stream in are counted as without it).
        """
        ratio = self._ratio(optimizer)
        sizes = [0, 0]  # the two largest parameters' states (a sliced one holds a chunk at most)
        # with host_step the host masters' states never come to the device (when their gradients go to the host)
        on_host = self._steps_on_host(optimizer) and self._share() >= 1  # a share leaves some to stream
        through_device = 0
        for g in optimizer.param_groups:
            for p in g["params"]:
                if not p.requires_grad or (on_host and self._manages(p)):
                    continue
                nbytes = self._estimated_state_bytes(optimizer, p, ratio)
                through_device += nbytes
                if not self._sliceable(optimizer, p):
                    sizes = sorted([*sizes, nbytes])[-2:]
        if on_host:
            total_state_bytes = min(total_state_bytes, through_device)
        states = min(total_state_bytes, max(self.chunk_bytes, sizes[1]))
        if self.overlap_copies:  # the chunk coming in and the one going out beside the one that steps
            states = min(total_state_bytes, states + 2 * max(self.chunk_bytes, sizes[0]))
        if self.masters is not None and len(self.masters) and not on_host:
            return 2 * states  # a chunk's fp32 masters and fp32 gradients: as many bytes as AdamW's two moments
        return states

    def clear(self) -> None:
        """Forget the buffer bookkeeping (the optimizers keep their CPU states) and the host step's scratch."""
        self._slots.clear()
        self._host_scratch = None


__all__ = ["StreamedOptimizerStates", "UnsupportedOptimizerError", "check_streamable"]
