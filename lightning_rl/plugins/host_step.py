"""The optimizer step of host-master weights run by the CPU, where their masters, states and gradients already are.

With the fp32 masters in host memory (:class:`~lightning_rl.plugins.host_masters.HostMasterWeights`), the optimizer
states too (:class:`~lightning_rl.plugins.streamed_states.StreamedOptimizerStates`) and the gradients sent there by
the backward (:class:`~lightning_rl.plugins.host_gradients.HostGradients`), a step on the device copies each
chunk's master, moments and gradient in and the master and moments out: 26 bytes per AdamW parameter across PCIe
(7 GB in and 6 GB out for a Qwen2.5-0.5B shape), with the device busy beside a rollout engine that generates
meanwhile. :func:`step_on_host` steps those parameters on the CPU instead, in chunks:

1. each gradient is upcast into an fp32 scratch buffer (times the gradient-clipping factor, when set);
2. the optimizer, pointed at the masters and switched to its fused kernel, steps the masters and the moments in
   place in host memory;
3. each master is rounded into its gradient's pinned host buffer, free once upcast, and that buffer is copied to
   the parameter's own device storage asynchronously, on the current stream, while the CPU steps the next chunk.

Only the compute-dtype weights cross PCIe (2 bytes per parameter) and the device runs no kernel. The update is the
same AdamW step as on the device: the same fp32 values in, PyTorch's fused kernel for the CPU instead of the one for
CUDA (they may differ in the last bits of a few elements). The next backward writes its gradients into the same
host buffers with copies queued on the same stream, so they wait for the weight copies that read them.

Adam and AdamW (the modules' default optimizer) only, without ``capturable`` or ``differentiable``
(:func:`host_step_refusal`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def _counters(optimizer: Optimizer, params: Sequence[nn.Parameter]) -> list[tuple[dict[str, Any], str, torch.device]]:
    """``(state, key, device)`` of the zero-dimensional state tensors (step counters) of ``params``."""
    out = []
    for p in params:
        state = optimizer.state.get(p) or {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == 0:
                out.append((state, key, value.device))
    return out


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


@contextmanager
def _fused_kernel(optimizer: Optimizer) -> Iterator[None]:
    """Within: every group of ``optimizer`` runs PyTorch's fused kernel (on the CPU: one pass per tensor)."""
    before = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            g["fused"], g["foreach"] = True, False
        yield
    finally:
        for g, (fused, foreach) in zip(optimizer.param_groups, before, strict=True):
            g["fused"], g["foreach"] = fused, foreach


def chunks_by_numel(params: Sequence[nn.Parameter], numel: int) -> list[list[nn.Parameter]]:
    """``params`` in order, in chunks of at most ``numel`` elements (a larger parameter alone)."""
    out: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    for p in params:
        if current and size + p.numel() > numel:
            out.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        out.append(current)
    return out


def step_on_host(
    optimizer: Optimizer,
    params: Sequence[nn.Parameter],
    masters: HostMasterWeights,
    gradients: HostGradients,
    run: Callable[[], Any],
    chunk_numel: int = 32 * 1024**2,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Step ``params`` (host-master weights whose gradients wait in host memory) on the CPU, chunk by chunk.

    Args:
        optimizer: Adam or AdamW holding ``params`` (:func:`host_step_refusal` says None); every other parameter's
            ``.grad`` must be None, so that ``run`` steps only the chunk in hand.
        params: parameters :meth:`HostMasterWeights.manages` and :meth:`HostGradients.holds`.
        masters: their fp32 masters; :attr:`HostMasterWeights.grad_scale` is the clipping factor, when set.
        gradients: their gradients; each buffer carries the stepped weights to the device afterwards, so the
            gradients are released (not held any more) as their chunk steps.
        run: one optimizer step over the parameters whose gradients are visible.
        chunk_numel: elements stepped per call of ``run`` (the fp32 scratch buffer holds as many, or one larger
            parameter).
        scratch: the fp32 buffer an earlier call returned, used again when large enough: a fresh one of hundreds
            of MB costs its page faults on every step.

    Returns:
        The scratch buffer, for the next call (None when there was nothing to step).

    Raises:
        ValueError: ``optimizer`` cannot step on the CPU (:func:`host_step_refusal`).
    """
    refusal = host_step_refusal(optimizer)
    if refusal is not None:
        raise ValueError(f"the optimizer step cannot run on the host: {refusal}")
    if not params:
        return scratch
    for device in {p.device for p in params if p.is_cuda}:  # the backward's copies into the host buffers are done
        torch.cuda.synchronize(device)
    scale = None if masters.grad_scale is None else float(masters.grad_scale)
    chunks = chunks_by_numel(params, chunk_numel)
    need = max(sum(p.numel() for p in c) for c in chunks)
    if scratch is None or scratch.numel() < need:
        scratch = torch.empty(need, dtype=torch.float32)
    counters = _counters(optimizer, params)
    _move_counters(counters, torch.device("cpu"))
    first = [p for p in params if not optimizer.state.get(p)]  # their states are made by this step, on the CPU
    try:
        with _fused_kernel(optimizer), torch.no_grad():
            for chunk in chunks:
                _step_chunk(optimizer, chunk, masters, gradients, run, scratch, scale)
    finally:
        # the counters go back; those the first step made go where the optimizer would have made them
        made = [(state, key, p.device if _on_device(optimizer, p) else torch.device("cpu"))
                for p in first for state, key, _ in _counters(optimizer, [p])]
        _move_counters(counters + made, None)
    return scratch


def _on_device(optimizer: Optimizer, p: nn.Parameter) -> bool:
    """Whether ``optimizer`` keeps ``p``'s step counters on ``p``'s device: its group is fused (a capturable one,
    the other such case, never steps on the host).
    """
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return bool(g.get("fused"))
    return False


def _step_chunk(
    optimizer: Optimizer,
    chunk: Sequence[nn.Parameter],
    masters: HostMasterWeights,
    gradients: HostGradients,
    run: Callable[[], Any],
    scratch: torch.Tensor,
    scale: float | None,
) -> None:
    """Step one chunk's masters on the CPU, then send the rounded weights to the device through the grad buffers."""
    own: list[torch.Tensor] = []
    offset = 0
    try:
        for p in chunk:
            grad = scratch[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            grad.copy_(gradients.host_gradient(p))
            if scale is not None:
                grad.mul_(scale)
            own.append(p.data)
            p.data = masters.master(p)
            p.grad = grad
        run()
    finally:
        for p, data in zip(chunk, own, strict=False):
            p.grad = None
            p.data = data
    for p in chunk:  # the master's new values, rounded, reach the device through its gradient's pinned buffer
        buf = gradients.host_gradient(p)
        buf.copy_(masters.master(p))
        p.data.copy_(buf, non_blocking=buf.is_pinned())
        gradients.release(p)


__all__ = ["chunks_by_numel", "host_step_refusal", "step_on_host"]
