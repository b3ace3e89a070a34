"""The policy's weights as the engine process loads them: each engine weight a base tensor plus LoRA products.

:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine` hands the engine process views of the trainer's own
tensors (CUDA IPC), once. For a full fine-tune each engine weight is one trained parameter. For a LoRA policy it is
the frozen base weight and the adapter's ``A`` and ``B`` matrices: the engine process adds ``scale * B @ A`` at each
sync (:func:`merged_weight`), one weight at a time, so the engine generates with merged weights and no LoRA
kernels, and the trainer's process holds no merged copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_rl.lora import is_lora
from lightning_rl.rollout.policy_weights import base_weights, full_weights, strip_peft


@dataclass(frozen=True)
class LoRAProduct:
    """One adapter's low-rank update of a linear weight: ``scale * b @ a``.

    Args:
        a: ``[r, in_features]`` (peft's ``lora_A``).
        b: ``[out_features, r]`` (peft's ``lora_B``).
        scale: peft's ``scaling`` of the adapter (``lora_alpha / r``, or over ``sqrt(r)`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class EngineWeight:
    """One weight under the name the engine's ``load_weights`` takes, with the LoRA products to add to it."""

    name: str
    base: torch.Tensor
    products: tuple[LoRAProduct, ...] = ()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this weight is made of (base first)."""
        return [self.base, *(t for p in self.products for t in (p.a, p.b))]


def merged_weight(base: torch.Tensor, products: tuple[LoRAProduct, ...] | list[LoRAProduct]) -> torch.Tensor:
    """``base + sum(scale * b @ a)`` in fp32 (``base`` itself when there is nothing to add)."""
    if not products:
        return base
    out = base.float()  # a copy unless base is fp32
    if out.data_ptr() == base.data_ptr():
        out = out.clone()
    for p in products:
        out.addmm_(p.b.float(), p.a.float(), alpha=p.scale)
    return out


def merge_unsupported_reason(model: nn.Module) -> str | None:
    """Why the engine process cannot merge ``model``'s adapters itself (None when it can, or without LoRA)."""
    if not is_lora(model):
        return None
    from peft.tuners.lora import LoraLayer

    for name, cfg in model.peft_config.items():
        if type(cfg).__name__ != "LoraConfig":
            return f"adapter {name!r} is a {type(cfg).__name__}, not plain LoRA"
    for module_name, layer in model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged:
            continue
        base = layer.get_base_layer()
        active = [a for a in layer.active_adapters if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]
        if not active:
            continue
        if type(base) is not nn.Linear:
            return f"LoRA on {module_name}, a {type(base).__name__} (the engine process merges nn.Linear layers only)"
        if getattr(layer, "fan_in_fan_out", False):
            return f"LoRA on {module_name} with fan_in_fan_out"
        for adapter in active:
            if getattr(layer, "use_dora", {}).get(adapter, False):
                return "DoRA adapters"
            if getattr(layer, "lora_bias", {}).get(adapter, False):
                return "LoRA biases (lora_bias=True)"
            if adapter not in layer.lora_A:
                return f"LoRA embeddings on {module_name}"
    return None


def engine_weights(model: nn.Module) -> list[EngineWeight]:
    """The policy's weights for the engine process: plain parameters, or LoRA base weights with their products.

    Raises:
        ValueError: the engine process cannot merge this adapter (:func:`merge_unsupported_reason`).
    """
    if not is_lora(model):
        return [EngineWeight(name, t) for name, t in full_weights(model)]
    reason = merge_unsupported_reason(model)
    if reason:
        raise ValueError(f"the engine process cannot merge this LoRA adapter: {reason}")
    products = {name: lora_products(layer) for name, layer in lora_layers_by_weight(model).items()}
    return [EngineWeight(name, t, products.get(name, ())) for name, t in base_weights(model)]


def lora_layers_by_weight(model: nn.Module) -> dict[str, nn.Module]:
    """Every unmerged peft LoRA layer of a LoRA policy, under its base weight's engine name."""
    from peft.tuners.lora import LoraLayer

    return {strip_peft(f"{module_name}.base_layer.weight"): layer
            for module_name, layer in model.get_base_model().named_modules()
            if isinstance(layer, LoraLayer) and not layer.merged}


def lora_products(layer: nn.Module) -> tuple[LoRAProduct, ...]:
    """The products of a peft LoRA layer's active adapters, with their current weights."""
    return tuple(LoRAProduct(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(), float(layer.scaling[a]))
                 for a in layer.active_adapters if a in layer.lora_A)


__all__ = ["EngineWeight", "LoRAProduct", "engine_weights", "lora_layers_by_weight", "lora_products",
           "merge_unsupported_reason", "merged_weight"]
