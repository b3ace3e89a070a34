"""The optimizer step of host-master weights run by the CPU, where their masters, states and gradients already are.

With the fp32 masters in host memory (:class:`~lightning_rl.plugins.host_masters.HostMasterWeights`), the optimizer
states too (:class:`~lightning_rl.plugins.streamed_states.StreamedOptimizerStates`) and the gradients sent there by
the backward (:class:`~lightning_rl.plugins.host_gradients.HostGradients`), a step on the device copies each
chunk's master, moments and gradient in and the master and moments out: 26 bytes per AdamW parameter across PCIe
(7 GB in and 6 GB out for a Qwen2.5-0.5B shape), with the device busy beside a rollout engine that generates
meanwhile. :class:`HostStep` steps those parameters on the CPU instead, in chunks:

1. each gradient is upcast into an fp32 scratch buffer (times the gradient-clipping factor, when set);
2. an optimizer of the same type and settings over stand-ins for the parameters (views of their masters), with
   PyTorch's fused kernel, steps the masters and the moments in place in host memory;
3. each master is rounded into its gradient's pinned host buffer, free once upcast, and that buffer is copied to
   the parameter's own device storage asynchronously, on the caller's stream, while the CPU steps the next chunk.

Only the compute-dtype weights cross PCIe (2 bytes per parameter) and the device runs no kernel. The update is the
same AdamW step as on the device: the same fp32 values in, PyTorch's fused kernel for the CPU instead of the one for
CUDA (they may differ in the last bits of a few elements). The next backward writes its gradients into the same
host buffers with copies queued on the same stream, so they wait for the weight copies that read them.

The CPU and the PCIe link are separate resources: the streamer runs a :class:`HostStep` on a thread of its own while
it streams the other parameters through the device, and :func:`host_share` picks which host masters step where.
The step never sets a gradient on the real parameters and never adds a key to ``optimizer.state`` until
:meth:`HostStep.finish`, so the streamer's own ``optimizer.step()`` calls meanwhile only see their chunk.

Adam and AdamW (the modules' default optimizer) only, without ``capturable`` or ``differentiable``
(:func:`host_step_refusal`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_rl.plugins.host_gradients import HostGradients
    from lightning_rl.plugins.host_masters import HostMasterWeights

_STEPPED_ON_HOST = (torch.optim.Adam, torch.optim.AdamW)


def host_step_refusal(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot step host-master weights on the CPU, or None when it can."""
    if type(optimizer) not in _STEPPED_ON_HOST:
        return f"{type(optimizer).__name__} is not torch.optim.Adam or AdamW (the optimizers with a fused CPU kernel)"
    for group in optimizer.param_groups:
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                return f"a parameter group sets {flag}=True"
        lr = group.get("lr")
        if torch.is_tensor(lr) and lr.device.type != "cpu":
            return "a parameter group's learning rate is a device tensor"
    return None


def host_step_setting(value: object, setting: str) -> bool | float | str:
    """``value`` checked as a host-step setting: a bool, ``"auto"``, or a share in [0, 1] (returned as a float).

    Raises:
        ValueError: anything else, naming ``setting`` (``"MemoryAwarePrecision(step_on_host=...)"``) and the values
            it takes.
    """
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[return-value]
    if isinstance(value, int | float) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{setting} got {value!r}: use True, False, 'auto' or the share of the host masters' elements "
                     "to step on the CPU, a number in [0, 1]")


def _move_counters(entries: list[tuple[dict[str, Any], str, torch.device]], to: torch.device | None) -> None:
    """Move the counters to ``to`` (None: back to the device each came from) in one copy per device."""
    by_device: dict[tuple[torch.device, torch.device], list[tuple[dict[str, Any], str]]] = {}
    for state, key, home in entries:
        src, dst = state[key].device, home if to is None else to
        if src != dst:
            by_device.setdefault((src, dst), []).append((state, key))
    for (_, dst), items in by_device.items():
        moved = torch.stack([state[key] for state, key in items]).to(dst)
        for (state, key), value in zip(items, moved.unbind(), strict=True):
            state[key] = value.clone()  # a tensor of its own, as the optimizer made it


def chunks_by_size(
    params: Sequence[nn.Parameter], limit: int, size: Callable[[nn.Parameter], int] = torch.Tensor.numel
) -> list[list[nn.Parameter]]:
    """``params`` in order, in chunks of at most ``limit`` of ``size`` (elements by default; a larger one alone)."""
    out: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    total = 0
    for p in params:
        n = size(p)
        if current and total + n > limit:
            out.append(current)
            current, total = [], 0
        current.append(p)
        total += n
    if current:
        out.append(current)
    return out


def host_share(params: Sequence[nn.Parameter], share: float) -> set[int]:
    """``id`` of the parameters to step on the CPU: about ``share`` of the elements of ``params``, largest first.

    The rest stream through the device at the same time, so the two sides should end together: each parameter goes
    to the CPU while it fits in the CPU's share. ``share >= 1`` takes all of them, ``share <= 0`` none.
    """
    if share >= 1:
        return {id(p) for p in params}
    budget = share * sum(p.numel() for p in params)
    taken, out = 0, set()
    for p in sorted(params, key=lambda q: q.numel(), reverse=True):
        if taken + p.numel() <= budget:
            out.add(id(p))
            taken += p.numel()
    return out


AUTO_SHARE_START = 0.5
AUTO_SHARE_BOUNDS = (0.1, 0.9)  # both sides keep some weights, so both keep being timed


def balanced_share(share: float, host: tuple[int, float], device: tuple[int, float]) -> float:
    """The next automatic share of the CPU, from the last step's ``(elements, seconds)`` on each side.

    Both sides run at once, so the step ends when the slower one does; they end together when the CPU's share of
    the elements is its share of the throughput, ``h / (h + d)`` in elements per second. The new share moves
    halfway there from ``share`` (one slow step does not swing it), within :data:`AUTO_SHARE_BOUNDS`.
    """
    (host_n, host_s), (dev_n, dev_s) = host, device
    if min(host_n, dev_n) <= 0 or min(host_s, dev_s) <= 0:
        return share
    h, d = host_n / host_s, dev_n / dev_s
    low, high = AUTO_SHARE_BOUNDS
    return min(high, max(low, (share + h / (h + d)) / 2))


class HostStep:
    """One optimizer step of some host-master weights on the CPU, inline or on a thread of its own.

    Made in the caller's thread (it waits for the backward's copies into the host buffers), started there, and
    ended there by :meth:`finish`, which installs the new states and releases the stepped gradients. Meanwhile it
    steps the existing moment tensors in place but adds no key to ``optimizer.state``, replaces none of its
    entries and leaves ``optimizer.param_groups`` as they are.

    Args:
        optimizer: Adam or AdamW holding ``params`` (:func:`host_step_refusal` says None).
        params: parameters :meth:`HostMasterWeights.manages` and :meth:`HostGradients.holds`.
        masters: their fp32 masters; :attr:`HostMasterWeights.grad_scale` is the clipping factor, when set.
        gradients: their gradients; each buffer carries the stepped weights to the device afterwards.
        chunk_numel: elements stepped at once (the fp32 scratch buffer holds as many, or one larger parameter).
        scratch: the fp32 buffer an earlier step returned, used again when large enough: a fresh one of hundreds
            of MB costs its page faults on every step.

    Raises:
        ValueError: ``optimizer`` cannot step on the CPU (:func:`host_step_refusal`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[nn.Parameter],
        masters: HostMasterWeights,
        gradients: HostGradients,
        chunk_numel: int = 32 * 1024**2,
        scratch: torch.Tensor | None = None,
    ) -> None:
        refusal = host_step_refusal(optimizer)
        if refusal is not None:
            raise ValueError(f"the optimizer step cannot run on the host: {refusal}")
        self.optimizer, self.params, self.masters, self.gradients = optimizer, list(params), masters, gradients
        for device in {p.device for p in self.params if p.is_cuda}:  # the backward's copies into the buffers are done
            torch.cuda.synchronize(device)
        # the weights' copies go on the caller's streams, where the next forward and backward find them ordered
        self._streams = {p.device: torch.cuda.current_stream(p.device) for p in self.params if p.is_cuda}
        self._scale = None if masters.grad_scale is None else float(masters.grad_scale)
        self._chunks = chunks_by_size(self.params, chunk_numel)
        need = max((sum(p.numel() for p in c) for c in self._chunks), default=0)
        if need and (scratch is None or scratch.numel() < need):
            scratch = torch.empty(need, dtype=torch.float32)
        self.scratch = scratch
        self.stepped: list[nn.Parameter] = []
        self._states: dict[int, dict[str, Any]] = {}  # the stepped parameters' new states, installed by finish()
        self._made: set[int] = set()  # those whose states this step made (their first step)
        self._returning: list[tuple[dict[str, Any], str, torch.device]] = []  # stepped counters, to go back
        self.seconds = 0.0  # the step's wall time on its thread, the weights' copies queued (not waited for)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, background: bool = True) -> HostStep:
        """Step, on a thread of its own (``background``) or here and now. Returns ``self``."""
        if background and self.params:
            self._thread = threading.Thread(target=self._run, name="lightning-rl host step", daemon=True)
            self._thread.start()
        else:
            self._run()
        return self

    def step_now(self) -> torch.Tensor | None:
        """Step here and now, and finish. Returns the scratch buffer, for the next step.

        Raises:
            Exception: what the step raised; the parameters it had not stepped keep their held gradients.
        """
        error = self.start(background=False).finish()
        if error is not None:
            raise error
        return self.scratch

    def finish(self) -> BaseException | None:
        """Wait for the step, install the stepped parameters' states and release their gradients.

        Returns the error the step raised, if any: the parameters it had not stepped keep their masters, states
        and held gradients, for a retry.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        made = []  # counters of states made by this step go where the optimizer itself would have made them
        for p in self.stepped:
            if id(p) in self._made:
                home = p.device if _on_device(self.optimizer, p) else torch.device("cpu")
                made += [(state, key, home) for state, key, _ in _counters_of(self._states[id(p)])]
        _move_counters(self._returning + made, None)
        for p in self.stepped:
            self.optimizer.state[p] = self._states[id(p)]
            self.gradients.release(p)
        return self._error

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            with torch.no_grad():
                views = {}
                for p in self.params:  # shallow copies: the moments are stepped in place, the counters replaced
                    state = self.optimizer.state.get(p)
                    views[id(p)] = dict(state) if state else {}
                    if not state:
                        self._made.add(id(p))
                counters = {id(p): _counters_of(views[id(p)]) for p in self.params}
                _move_counters([e for entries in counters.values() for e in entries], torch.device("cpu"))
                for chunk in self._chunks:
                    self._step_chunk(chunk, views, counters)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread by finish()
            self._error = err
        self.seconds = time.perf_counter() - started

    def _step_chunk(
        self,
        chunk: Sequence[nn.Parameter],
        views: dict[int, dict[str, Any]],
        counters: dict[int, list[tuple[dict[str, Any], str, torch.device]]],
    ) -> None:
        """Step one chunk's masters on the CPU, then send the rounded weights to the device through the grad buffers.

        ``views`` holds each parameter's state dict as stepped here, ``counters`` its step counters (moved to the CPU
        in those dicts): once the chunk has stepped, they go back by :meth:`finish`. An unstepped parameter's real
        state was never touched.
        """
        stand_ins = []
        offset = 0
        for p in chunk:
            grad = self.scratch[offset:offset + p.numel()].view(p.shape)  # type: ignore[index]
            offset += p.numel()
            grad.copy_(self.gradients.host_gradient(p))
            if self._scale is not None:
                grad.mul_(self._scale)
            stand_in = nn.Parameter(self.masters.master(p))  # the master's own storage
            stand_in.grad = grad
            stand_ins.append(stand_in)
        view = _view_optimizer(self.optimizer, chunk, stand_ins)
        for p, stand_in in zip(chunk, stand_ins, strict=True):
            if views[id(p)]:
                view.state[stand_in] = views[id(p)]
        view.step()
        for p, stand_in in zip(chunk, stand_ins, strict=True):
            self._states[id(p)] = views[id(p)] = view.state[stand_in]
        self.stepped += chunk  # masters and moments have stepped: a retry must not step them again
        self._returning += [e for p in chunk for e in counters[id(p)]]
        for p in chunk:  # the master's new values, rounded, reach the device through its gradient's pinned buffer
            if self.masters.stages(p):  # or wait in a host buffer of their own for the next flush
                self.masters.write_weight(p, p.data, self.masters.master(p))
                continue
            buf = self.gradients.host_gradient(p)
            buf.copy_(self.masters.master(p))
            if p.is_cuda:
                with torch.cuda.stream(self._streams[p.device]):
                    p.data.copy_(buf, non_blocking=buf.is_pinned())
            else:
                p.data.copy_(buf)


def _counters_of(state: dict[str, Any]) -> list[tuple[dict[str, Any], str, torch.device]]:
    """``(state, key, device)`` of a state dict's zero-dimensional tensors (step counters)."""
    return [(state, k, v.device) for k, v in state.items() if torch.is_tensor(v) and v.dim() == 0]


def _view_optimizer(optimizer: Optimizer, chunk: Sequence[nn.Parameter], stand_ins: Sequence[nn.Parameter]
                    ) -> Optimizer:
    """An optimizer of ``optimizer``'s type over ``stand_ins``, each in its parameter's group, with the fused kernel."""
    by_id = {id(p): s for p, s in zip(chunk, stand_ins, strict=True)}
    groups = []
    for g in optimizer.param_groups:
        mine = [by_id[id(p)] for p in g["params"] if id(p) in by_id]
        if mine:
            settings = {k: v for k, v in g.items() if k != "params"}
            groups.append({**settings, "params": mine, "fused": True, "foreach": False})
    return type(optimizer)(groups)


def _on_device(optimizer: Optimizer, p: nn.Parameter) -> bool:
    """Whether ``optimizer`` keeps ``p``'s step counters on ``p``'s device: its group is fused (a capturable one,
    the other such case, never steps on the host).
    """
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return bool(g.get("fused"))
    return False


__all__ = ["AUTO_SHARE_BOUNDS", "AUTO_SHARE_START", "HostStep", "balanced_share", "chunks_by_size", "host_share",
           "host_step_refusal", "host_step_setting"]
