"""One copy of a LoRA policy's frozen base weights on the GPU, shared by the trainer and the vLLM engine.

After the engine has loaded the base weights, each frozen base parameter of the transformers
model is re-pointed at the matching slice of the engine's weight storage (vLLM packs
``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` along the output
rows, so each part is a contiguous row range), and the trainer's own copy is freed. Only the
LoRA adapter tensors are pushed at each sync. Because the trainer now reads the engine's weight
memory, the engine may never release its weights while training runs: it sleeps by releasing
its KV cache only (:func:`~lightning_rl.rollout.vllm_internals.release_kv_cache`), and
:meth:`SharedBaseWeights.unshare` gives the trainer private copies back before the engine shuts down.
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

    Returns:
        ``({name: (parameter, view)}, None)`` when every frozen parameter has a view of the same
        shape, dtype and device holding the same values, else ``({}, reason)``.
    """
    packed: Mapping[str, list[str]] = getattr(engine_model, "packed_modules_mapping", None) or {}
    part_of = {part: (fused, parts) for fused, parts in packed.items() for part in parts}
    engine = {_clean(n): p for n, p in engine_model.named_parameters()}
    base = frozen_base_parameters(model)
    if not base:
        return {}, "the policy has no frozen base parameters"
    views: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for name, p in base.items():
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        offset, target = 0, name
        if module in part_of:
            fused, parts = part_of[module]
            target = f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}"
            for sibling in parts[: parts.index(module)]:
                prev = base.get(f"{parent}.{sibling}.{leaf}" if parent else f"{sibling}.{leaf}")
                if prev is None:
                    return {}, f"{name}: its packed sibling {sibling} is not a frozen base parameter"
                offset += prev.shape[0]
        src = engine.get(target)
        if src is None:
            return {}, f"{name}: the engine has no parameter {target}"
        if src.dtype != p.dtype or src.device != p.device:
            return {}, (f"{name}: the engine holds it as {src.dtype} on {src.device}, the trainer as {p.dtype} on "
                        f"{p.device} (share only when both use the same dtype, e.g. bf16 frozen weights)")
        if src.dim() != p.dim() or src.shape[1:] != p.shape[1:] or offset + p.shape[0] > src.shape[0]:
            return {}, f"{name}: shape {tuple(p.shape)} does not fit {target} {tuple(src.shape)} at row {offset}"
        view = src.detach().narrow(0, offset, p.shape[0]) if p.dim() else src.detach()
        if not torch.equal(view, p.detach()):
            return {}, f"{name}: the engine's {target} rows {offset}:{offset + p.shape[0]} hold other values"
        views[name] = (p, view)
    return views, None


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
    "SharedBaseWeights",
    "base_weight_views",
    "frozen_base_parameters",
    "share_base_with_engine",
]
