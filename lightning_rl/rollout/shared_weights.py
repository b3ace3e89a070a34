"""One copy of a LoRA policy's frozen base weights on the GPU, shared by the trainer and the vLLM engine.

After the engine has loaded the base weights, each frozen base parameter of the transformers
model is re-pointed at the matching slice of the engine's weight storage (vLLM packs
``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` along the output
rows, so each part is a contiguous row range), and the trainer's own copy is freed. Only the
LoRA adapter tensors are pushed at each sync. Because the trainer now reads the engine's weight
memory, the engine may never release its weights while training runs: it sleeps by releasing
its KV cache only (:func:`~lightning_rl.rollout.vllm_internals.release_kv_cache`), and
:meth:`SharedBaseWeights.unshare` gives the trainer private copies back before the engine shuts down.

The trainer's copy leaves the GPU before the engine allocates its weights (:func:`park_base_on_host`), so
the two copies never meet there, and the engine loads the base from host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_rl.models import unwrap

log = logging.getLogger(__name__)


def _clean(name: str) -> str:
    """Parameter name without peft's or vLLM's LoRA ``base_layer`` wrapper."""
    return name.replace(".base_layer.", ".")


def frozen_base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen floating-point base parameters of a (LoRA) policy, by transformers name."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad or not p.is_floating_point() or "lora_" in name or ".original_module." in name:
            continue
        out[_clean(name)] = p
    return out


def base_weight_views(
    model: nn.Module, engine_model: nn.Module
) -> tuple[dict[str, tuple[nn.Parameter, torch.Tensor]], str | None]:
    """Match each frozen base parameter of ``model`` to a view of ``engine_model``'s weights.

    A parameter parked in host memory (:func:`park_base_on_host`) matches a view on the device.

    Returns:
        ``({name: (parameter, view)}, None)`` when every frozen parameter has a view of the same
        shape, dtype and device holding the same values, else ``({}, reason)``.
    """
    base = frozen_base_parameters(model)
    if not base:
        return {}, "the policy has no frozen base parameters"
    views, reason, _ = weight_views(base, engine_model)
    return views, reason


def weight_views(
    params: Mapping[str, nn.Parameter], engine_model: nn.Module, skip_other_dtypes: bool = False
) -> tuple[dict[str, tuple[nn.Parameter, torch.Tensor]], str | None, dict[str, str]]:
    """Match each of ``params`` (by transformers name) to the rows of ``engine_model``'s weight that hold it.

    vLLM packs ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` along the output rows
    (``packed_modules_mapping``), so each part is a contiguous row range; the offset counts the rows of the
    siblings before it, which must be among ``params`` too.

    Args:
        params: ``{transformers name: parameter}``.
        engine_model: has ``named_parameters()`` and, for packed layers, ``packed_modules_mapping``.
        skip_other_dtypes: leave out a parameter the engine holds in another dtype or lacks, instead of failing.

    Returns:
        ``(views, None, skipped)`` with ``views`` ``{name: (parameter, view)}`` and ``skipped`` ``{name: why}``,
        or ``({}, reason, {})`` when a parameter cannot be matched (its shape or values differ from the engine's).
    """
    packed: Mapping[str, list[str]] = getattr(engine_model, "packed_modules_mapping", None) or {}
    part_of = {part: (fused, parts) for fused, parts in packed.items() for part in parts}
    engine = {_clean(n): p for n, p in engine_model.named_parameters()}
    views: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for name, p in params.items():
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        offset, target = 0, name
        if module in part_of:
            fused, parts = part_of[module]
            target = f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}"
            for sibling in parts[: parts.index(module)]:
                prev = params.get(f"{parent}.{sibling}.{leaf}" if parent else f"{sibling}.{leaf}")
                if prev is None:
                    return {}, f"{name}: its packed sibling {sibling} is not among the weights to share", {}
                offset += prev.shape[0]
        src = engine.get(target)
        if src is None:
            if skip_other_dtypes:
                skipped[name] = f"the engine has no parameter {target}"
                continue
            return {}, f"{name}: the engine has no parameter {target}", {}
        if src.dtype != p.dtype or (src.device != p.device and p.device.type != "cpu"):
            why = (f"{name}: the engine holds it as {src.dtype} on {src.device}, the trainer as {p.dtype} on "
                   f"{p.device} (share only when both use the same dtype, e.g. bf16 frozen weights)")
            if skip_other_dtypes:
                skipped[name] = why
                continue
            return {}, why, {}
        if src.dim() != p.dim() or src.shape[1:] != p.shape[1:] or offset + p.shape[0] > src.shape[0]:
            return {}, f"{name}: shape {tuple(p.shape)} does not fit {target} {tuple(src.shape)} at row {offset}", {}
        view = src.detach().narrow(0, offset, p.shape[0]) if p.dim() else src.detach()
        if not torch.equal(view, p.detach().to(view.device)):  # a parked parameter is compared on the device
            return {}, f"{name}: the engine's {target} rows {offset}:{offset + p.shape[0]} hold other values", {}
        views[name] = (p, view)
    return views, None, skipped


def moved_parameter(views: Mapping[str, tuple[nn.Parameter, torch.Tensor]]) -> str | None:
    """The name of the first parameter of ``views`` (``{name: (parameter, view)}``) that no longer points at its
    view (something gave it new storage), or None.
    """
    return next((n for n, (p, view) in views.items() if p.data_ptr() != view.data_ptr()), None)


@dataclass
class SharedBaseWeights:
    """Frozen base parameters that currently point into the engine's weight memory."""

    views: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    @property
    def bytes_shared(self) -> int:
        """Device bytes the trainer no longer holds a copy of."""
        return sum(v.numel() * v.element_size() for _, v in self.views.values())

    def unshare(self) -> None:
        """Give every shared parameter a private copy again (before the engine's memory goes away)."""
        for p, view in self.views.values():
            if p.data.data_ptr() == view.data_ptr():
                p.data = view.clone()
        self.views = {}


@dataclass
class ParkedBase:
    """Frozen base parameters moved to host memory while an engine starts (:func:`park_base_on_host`)."""

    devices: list[tuple[nn.Parameter, torch.device]] = field(default_factory=list)  # each with its own device
    freed_bytes: int = 0  # device memory PyTorch counted as allocated before the move, and not after
    released_bytes: int = 0  # device memory PyTorch's allocator gave back to the driver

    def restore(self) -> None:
        """Move every parameter still in host memory back to its device (sharing failed, or the start did)."""
        for p, device in self.devices:
            if p.device != device:
                p.data = p.data.to(device)
        self.devices = []


def park_base_on_host(model: nn.Module, dtype: torch.dtype) -> tuple[ParkedBase, str | None]:
    """Move ``model``'s frozen base parameters to host memory, before an engine that will share them starts.

    Sharing replaces the trainer's copy with views of the engine's; parking it first keeps the GPU from
    holding both while the engine allocates its own, and gives the freed blocks back to the driver.

    Args:
        model: the LoRA policy.
        dtype: the engine's weight dtype; parameters of another dtype cannot be shared, so nothing moves then.

    Returns:
        The parked parameters and None, or an empty :class:`ParkedBase` and why nothing was moved.
    """
    base = frozen_base_parameters(model)
    if not base:
        return ParkedBase(), "the policy has no frozen base parameters"
    odd = next((n for n, p in base.items() if p.dtype != dtype or p.device.type != "cuda"), None)
    if odd is not None:
        p = base[odd]
        return ParkedBase(), f"{odd} is {p.dtype} on {p.device}, the engine's weights {dtype} on the GPU"
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    parked = ParkedBase([(p, p.device) for p in base.values()])
    for p in base.values():
        p.data = p.data.to("cpu")
    del base
    torch.cuda.empty_cache()
    parked.freed_bytes = allocated - torch.cuda.memory_allocated()
    parked.released_bytes = reserved - torch.cuda.memory_reserved()
    return parked, None


def share_base_with_engine(model: nn.Module, engine_model: nn.Module) -> tuple[SharedBaseWeights, str | None]:
    """Point ``model``'s frozen base parameters at ``engine_model``'s weights (see the module docstring).

    Returns:
        The shared parameters, and None; or an empty :class:`SharedBaseWeights` and why sharing is
        impossible (nothing is changed then).
    """
    views, reason = base_weight_views(model, engine_model)
    if reason:
        return SharedBaseWeights(), reason
    for p, view in views.values():
        p.data = view
    return SharedBaseWeights(views), None


__all__ = [
    "ParkedBase",
    "SharedBaseWeights",
    "base_weight_views",
    "weight_views",
    "frozen_base_parameters",
    "moved_parameter",
    "park_base_on_host",
    "share_base_with_engine",
]
