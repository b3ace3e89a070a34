"""Trainable weights stored in the compute dtype on the device, their fp32 masters in host memory.

Under autocast a linear layer casts its fp32 weight to bf16 before the matmul, and the backward computes the
weight's gradient in bf16 before casting it to fp32. :class:`HostMasterWeights` keeps what the matmul reads,
the bf16 copy, as the parameter itself, and the fp32 master in (pinned) host memory beside the optimizer
states that :class:`~lightning_rl.plugins.streamed_states.StreamedOptimizerStates` streams. The device then
holds half the weight bytes, half the gradient bytes and no autocast casts of those weights.

For linear weights, with one micro-batch, the update is bit-identical to the fp32-master one: the forward reads
the same bf16 values (round to nearest of the master), the gradient is the same bf16 tensor, upcast at the step.
With several micro-batches the gradients add up in bf16 instead of fp32. The embeddings are managed too: a
bf16 input embedding gives bf16 hidden states, so the residual stream between the decoder layers is bf16 (as in
a bf16 model and in the rollout engine) where an fp32 embedding keeps it fp32, and a tied embedding's two
gradients (the lookup's and the LM head's) add up in bf16.

For the optimizer step :meth:`HostMasterWeights.swap_in` points each parameter of a chunk at a device copy of
its master with the fp32 gradient, so a ``torch.optim`` optimizer steps the master (its states stay fp32);
:meth:`HostMasterWeights.swap_out` writes the result back into the master and, rounded, into the parameter's
own bf16 storage, whose address never changes (an engine process that maps it keeps reading it).

With :meth:`HostMasterWeights.stage` the rounded results wait in host buffers instead
(:class:`~lightning_rl.plugins.staged_weights.StagedWeights`) until :meth:`HostMasterWeights.flush_staged` copies them
in: for parameters that are a rollout engine's own weights, which it generates from while the update runs.

The module's ``state_dict`` gives the masters (fp32) for these weights and ``load_state_dict`` fills them, so
checkpoints and ``save_pretrained`` hold full-precision weights; an optimizer's ``load_state_dict`` sees the
masters too, so its loaded states stay fp32 (a fused group's step counters then go back beside their parameters,
:func:`step_counters_beside_their_parameters`). :meth:`HostMasterWeights.detach` puts fp32 weights back on the
device at the end of the fit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_rl.plugins.staged_weights import StagedWeights


def managed_weights(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """``(owner, name, parameter)`` of the trainable fp32 weights whose masters may live in host memory.

    Linear weights and embeddings: the input embedding, and the output embedding (the LM head) whether tied to it
    or not. A parameter that several modules hold (a tied embedding) comes once per holder, so that each holder's
    state dict gives the master. Never a LoRA adapter's matrices (a few MB, which peft's adapter state dict hands
    to the rollout engine as they are), a sparse embedding or a parameter that is not 2-D.
    """
    out: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[int] = set()  # owners (a module reached by two paths)
    for path, owner in module.named_modules():
        if not isinstance(owner, nn.Linear | nn.Embedding) or "lora_" in path:
            continue
        if isinstance(owner, nn.Embedding) and owner.sparse:
            continue
        p = owner.weight
        if p is None or id(owner) in seen or not p.requires_grad or p.dtype != torch.float32 or p.dim() != 2:
            continue
        seen.add(id(owner))
        out.append((owner, "weight", p))
    return out


def managed_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The distinct parameters of :func:`managed_weights` (a tied embedding once)."""
    found: dict[int, nn.Parameter] = {}
    for _, _, p in managed_weights(module):
        found.setdefault(id(p), p)
    return list(found.values())


class HostMasterWeights:
    """fp32 masters of trainable weights in host memory; the parameters hold the compute dtype.

    Args:
        dtype: the parameters' dtype on the device (the compute dtype, bf16 or fp16).
        pin_memory: keep the masters of CUDA parameters in pinned memory (fast asynchronous copies).
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, pin_memory: bool = True) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"host master weights need a 16-bit compute dtype, got {dtype}")
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._masters: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._names: dict[int, dict[str, nn.Parameter]] = {}  # id(owner) -> {name: parameter}
        self._swapped: dict[int, torch.Tensor] = {}  # id(parameter) -> its own storage while the master stands in
        self._handles: list[RemovableHandle] = []
        self.grad_scale: torch.Tensor | None = None  # a gradient-clipping factor for the next step's fp32 gradients
        self._optimizer_load: contextlib.AbstractContextManager | None = None
        self.staging: StagedWeights | None = None  # stepped weights waiting for the next flush (see stage())

    # ----------------------------------------------------------------------------- set-up
    def attach(self, module: nn.Module) -> int:
        """Move the masters of ``module``'s :func:`managed_weights` to host memory. Returns their bytes."""
        moved = 0
        added: list[nn.Parameter] = []
        for owner, name, p in managed_weights(module):
            if id(p) not in self._masters:
                pin = self.pin_memory and p.is_cuda
                master = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
                master.copy_(p.data)
                self._masters[id(p)] = (p, master)
                added.append(p)
                moved += master.numel() * master.element_size()
            if id(owner) not in self._names:
                self._names[id(owner)] = {}
                # torch marks its hooks with an attribute, which a bound method cannot take: partials can
                self._handles.append(owner.register_state_dict_post_hook(functools.partial(self._state_dict_hook)))
                self._handles.append(owner.register_load_state_dict_pre_hook(functools.partial(self._load_hook)))
            self._names[id(owner)][name] = p
        self._to_compute_dtype(added)
        return moved

    def _to_compute_dtype(self, params: Sequence[nn.Parameter]) -> None:
        """Store ``params`` in :attr:`dtype`, from their masters.

        On CUDA every fp32 weight is freed, and PyTorch's cache emptied, before the first 16-bit copy is allocated.
        Copies allocated while the fp32 weights still held the allocator's segments would each keep a segment
        partly in use, so the freed fp32 bytes could not go back to the driver: on an H200, SmolLM2's reserve stood
        at 0.61 GiB for 0.27 GiB of weights when each weight was converted in place.
        """
        on_cuda = [p for p in params if p.is_cuda]
        with torch.no_grad():
            for p in params:
                if not p.is_cuda:
                    p.data = p.data.to(self.dtype)
            if not on_cuda:
                return
            for p in on_cuda:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            torch.cuda.empty_cache()
            try:
                for p in on_cuda:  # cast in host memory: no fp32 temporary on the device
                    p.data = self._masters[id(p)][1].to(self.dtype).to(p.device)
            except BaseException:
                for p in on_cuda:  # never leave a parameter without its values
                    if p.numel() == 0 and self._masters[id(p)][1].numel() != 0:
                        p.data = self._masters[id(p)][1].to(p.device)
                raise

    def watch_optimizer(self, optimizer: Optimizer) -> None:
        """Let ``optimizer.load_state_dict`` see the fp32 masters, so the states it loads stay fp32."""
        self._handles.append(optimizer.register_load_state_dict_pre_hook(self._before_optimizer_load))
        self._handles.append(optimizer.register_load_state_dict_post_hook(self._after_optimizer_load))

    def detach(self) -> None:
        """Put the fp32 weights back into the parameters, on their device, and remove the hooks."""
        for p, master in self._masters.values():
            own = self._swapped.pop(id(p), None)
            device = (own if own is not None else p.data).device
            with torch.no_grad():
                p.data = master.to(device)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._masters.clear()
        self.staging = None  # the masters hold every stepped value
        self._names.clear()
        self.grad_scale = None

    # ----------------------------------------------------------------------------- staging
    def stage(self, params: Sequence[nn.Parameter]) -> StagedWeights:
        """From now on, the stepped values of ``params`` (managed ones) wait in host buffers for :meth:`flush_staged`.

        For parameters whose storage someone else reads while the optimizer steps (a rollout engine's weights).

        Raises:
            ValueError: a parameter's master does not live here, or staging is on already.
        """
        if self.staging is not None:
            raise ValueError("the stepped weights are staged already; call unstage() first")
        odd = next((p for p in params if id(p) not in self._masters), None)
        if odd is not None:
            raise ValueError(f"a parameter of shape {tuple(odd.shape)} has no host master here: only weights whose "
                             "fp32 masters live in host memory can wait for a flush")
        self.staging = StagedWeights(list(params), self.pin_memory)
        return self.staging

    def flush_staged(self) -> int:
        """Copy the stepped values waiting in host buffers into their parameters. Returns the bytes copied.

        Raises:
            RuntimeError: called mid-step (a parameter points at its master's copy).
        """
        if self.staging is None:
            return 0
        if self._swapped:
            raise RuntimeError("flush_staged during an optimizer step: the parameters point at their masters' copies")
        return self.staging.flush()

    def unstage(self) -> int:
        """Copy what waits into the parameters and stop staging. Returns the bytes copied."""
        moved = self.flush_staged()
        self.staging = None
        return moved

    def stages(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s stepped values wait in a host buffer."""
        return self.staging is not None and self.staging.holds(p)

    def write_weight(self, p: torch.Tensor, own: torch.Tensor, values: torch.Tensor, rows: slice | None = None) -> None:
        """Write ``p``'s stepped fp32 ``values`` (rows ``rows`` of it), rounded, into ``own`` (its storage) or its
        host buffer when staged.
        """
        if self.stages(p):
            self.staging.write(p, values, rows)  # type: ignore[union-attr]
            return
        with torch.no_grad():
            (own if rows is None else own[rows]).copy_(values)

    # ----------------------------------------------------------------------------- queries
    def manages(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s master lives here."""
        return id(p) in self._masters

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of ``p`` (host memory)."""
        return self._masters[id(p)][1]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose masters live here."""
        return [p for p, _ in self._masters.values()]

    def __len__(self) -> int:
        return len(self._masters)

    # ----------------------------------------------------------------------------- the step
    def swap_in(self, params: Sequence[nn.Parameter], loaded: Mapping[int, torch.Tensor] | None = None) -> None:
        """Point each managed parameter with a gradient at a device copy of its master, with the fp32 gradient.

        Each gradient is upcast (and multiplied by :attr:`grad_scale`, the clipping factor, when set). ``loaded``
        maps ``id(parameter)`` to a device copy of its master a caller has already made; the others are copied.
        """
        for p in params:
            if id(p) not in self._masters or id(p) in self._swapped or p.grad is None:
                continue
            master = self._masters[id(p)][1]
            grad = self.fp32_gradient(p.grad)
            own = p.data
            p.grad = None
            copy = None if loaded is None else loaded.get(id(p))
            with torch.no_grad():
                p.data = copy if copy is not None else master.to(own.device, non_blocking=master.is_pinned())
            p.grad = grad
            self._swapped[id(p)] = own

    def fp32_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (a compute-dtype gradient, or rows of one) upcast for its master, times :attr:`grad_scale`."""
        grad = grad.float()
        if self.grad_scale is not None:
            grad.mul_(self.grad_scale.to(grad.device))
        return grad

    def swap_out(self, params: Iterable[nn.Parameter], keep: bool = True) -> None:
        """Undo :meth:`swap_in`; with ``keep`` the stepped fp32 values go into the master and, rounded, the parameter
        (or its host buffer, :meth:`stage`).

        Without ``keep`` (an error mid-step) the parameter and its master stay as they were before the step.
        """
        for p in params:
            own = self._swapped.pop(id(p), None)
            if own is None:
                continue
            if keep:
                self.write_weight(p, own, p.data)
                with torch.no_grad():
                    master = self._masters[id(p)][1]
                    master.copy_(p.data, non_blocking=master.is_pinned())
            p.grad = None
            with torch.no_grad():
                p.data = own

    def swapped(self) -> list[nn.Parameter]:
        """The parameters that point at their masters now (between :meth:`swap_in` and :meth:`swap_out`)."""
        return [self._masters[i][0] for i in self._swapped]

    # ----------------------------------------------------------------------------- state dicts
    def _state_dict_hook(self, owner: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name, p in self._names.get(id(owner), {}).items():
            key = prefix + name
            if key in state_dict:
                state_dict[key] = self._masters[id(p)][1].detach()

    def _load_hook(self, owner: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        names = self._names.get(id(owner), {})
        if self.staging is not None and any(self.stages(p) and prefix + n in state_dict for n, p in names.items()):
            raise RuntimeError(
                "load_state_dict into weights that are the rollout engine's own memory "
                "(EngineSettings(share_trained_weights)): the load would write them while the engine "
                "generates. Load the checkpoint before the engine starts (Trainer.fit(ckpt_path=...) does) or after "
                "it shut down")
        with torch.no_grad():
            for name, p in names.items():
                value = state_dict.get(prefix + name)
                if torch.is_tensor(value) and value.shape == p.shape:
                    self._masters[id(p)][1].copy_(value)

    @contextlib.contextmanager
    def masters_in_place(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """Within: each managed parameter of ``params`` points at its (host) master."""
        params = [p for p in params if id(p) in self._masters and id(p) not in self._swapped]
        own = [p.data for p in params]
        try:
            with torch.no_grad():
                for p in params:
                    p.data = self._masters[id(p)][1]
            yield
        finally:
            with torch.no_grad():
                for p, data in zip(params, own, strict=True):
                    p.data = data

    def _before_optimizer_load(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ctx = self.masters_in_place(params)
        ctx.__enter__()
        self._optimizer_load = ctx

    def _after_optimizer_load(self, optimizer: Optimizer) -> None:
        ctx = self._optimizer_load
        if ctx is not None:
            self._optimizer_load = None
            ctx.__exit__(None, None, None)
        step_counters_beside_their_parameters(optimizer)


def step_counters_beside_their_parameters(optimizer: Optimizer) -> int:
    """Move the ``step`` counters of ``optimizer``'s fused or capturable groups to their parameters' devices.

    Such a group's kernel reads each counter on its parameter's device, and ``load_state_dict`` puts the counter
    on the device of the tensor it sees then: a host master's, while :meth:`HostMasterWeights.masters_in_place`
    holds. A resumed fit would then stop at its first fused CUDA step ("state_steps is on cpu"). Returns how many
    counters moved.
    """
    moved = 0
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(p.device)
                moved += 1
    return moved


__all__ = ["HostMasterWeights", "managed_parameters", "managed_weights", "step_counters_beside_their_parameters"]
