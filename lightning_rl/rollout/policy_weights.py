"""The policy's weights as vLLM takes them: plain, LoRA base, merged LoRA, or adapter tensors.

Names are the base transformers model's (peft's ``base_layer`` wrappers stripped), which is what
vLLM's ``load_weights`` maps; the LoRA rank is rounded up to one vLLM compiles kernels for.

A policy sharded by FSDP (``root``: the module Lightning's strategy wrapped) gives its full tensors one FSDP
unit or one parameter at a time (:mod:`~lightning_rl.rollout.sharded_weights`), never the whole model at once;
every process must then consume the same iterator to its end (each gather is a collective).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_rl.lora import is_lora
from lightning_rl.models import unwrap
from lightning_rl.rollout.sharded_weights import gathered_parameters, is_sharded

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest LoRA rank vLLM supports that holds ``r``."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def adapter_sync_unsupported_reason(model: nn.Module) -> str | None:
    """Why vLLM cannot take ``model``'s LoRA adapter as tensors (None when it can)."""
    if not is_lora(model):
        return "the model has no LoRA adapter"
    active = model.active_adapters if isinstance(model.active_adapters, list) else [model.active_adapter]
    if len(active) != 1:
        return f"{len(active)} adapters are active; vLLM takes one per request"
    cfg = model.peft_config[active[0]]
    if type(cfg).__name__ != "LoraConfig":
        return f"the adapter is a {type(cfg).__name__}, not plain LoRA"
    checks = (
        (getattr(cfg, "use_dora", False), "DoRA adapters are not supported by vLLM"),
        (getattr(cfg, "modules_to_save", None), "vLLM does not support modules_to_save"),
        (getattr(cfg, "bias", "none") != "none", "vLLM does not support LoRA biases"),
        (getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None),
         "per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported"),
        (cfg.r > VLLM_LORA_RANKS[-1], f"rank {cfg.r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


def strip_peft(name: str) -> str:
    """A peft parameter name under the base model's names (no ``base_layer``, no ``modules_to_save.<adapter>``)."""
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def policy_parameters(model: nn.Module, root: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of ``model``'s parameters, one at a time, gathered from FSDP shards when sharded.

    Args:
        model: the policy (or a part of it, such as a peft model's base model).
        root: the module the strategy wrapped (FSDP1 keeps the policy's outer parameters in a unit above it).
    """
    if is_sharded(model, root):
        yield from gathered_parameters(model, root)
    else:
        for name, p in model.named_parameters():
            yield name, p.detach()


def full_weights(model: nn.Module, root: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(transformers name, tensor)`` of every weight of a plain (non-LoRA) policy."""
    yield from policy_parameters(unwrap(model), root)


def base_weights(model: nn.Module, root: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen base weights of a LoRA policy under the base model's names."""
    for name, p in policy_parameters(model.get_base_model(), root):
        if "lora_" in name or ".original_module." in name:
            continue
        yield strip_peft(name), p


def merged_lora_weights(model: nn.Module, root: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a LoRA policy with its active adapters merged in (``W + delta``), without touching it.

    Raises:
        NotImplementedError: the policy is sharded by FSDP (sync the adapter instead).
    """
    from peft.tuners.lora import LoraLayer

    if is_sharded(model, root):
        raise NotImplementedError(
            "pushing merged LoRA weights from an FSDP-sharded policy is not supported: use lora_sync='adapter' "
            "(or 'auto') with an adapter vLLM can take, or train without FSDP (strategy='ddp')"
        )

    inner = model.get_base_model()
    layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for name, p in inner.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        w = p.detach()
        module_name, _, leaf = name.rpartition(".")
        layer = layers.get(module_name.removesuffix(".base_layer"))
        if layer is not None and leaf == "weight" and module_name.endswith(".base_layer") and not layer.merged:
            delta = None
            for adapter in layer.active_adapters:  # linear adapters, and embeddings' (lora_embedding_A/B)
                if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                    d = layer.get_delta_weight(adapter).float()
                    delta = d if delta is None else delta + d
            if delta is not None:
                w = (w.float() + delta).to(w.dtype)
        yield strip_peft(name), w


def sharded_adapter_tensors(model: nn.Module, adapter: str, root: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``adapter`` gathered from FSDP shards, under peft's checkpoint names (copies).

    The names are those ``get_peft_model_state_dict`` gives a LoRA adapter without biases: the parameter's
    name without the adapter's name. FSDP1 gathers each unit holding adapter tensors whole (its layer).
    """
    tag = f".{adapter}."
    return {name.replace(tag, ".", 1): t.clone() for name, t in policy_parameters(model, root)
            if "lora_" in name and tag in name}


def adapter_tensors(model: nn.Module, root: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The active adapter's LoRA tensors (peft checkpoint names) and its config as a plain dict."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    cfg = model.peft_config[name]
    if is_sharded(model, root):
        tensors = sharded_adapter_tensors(model, name, root)
    else:
        tensors = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    target = cfg.target_modules
    config = {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": sorted(target) if isinstance(target, set | list | tuple) else target,
        "bias": cfg.bias,
        "modules_to_save": cfg.modules_to_save,
        "use_rslora": cfg.use_rslora,
        "use_dora": getattr(cfg, "use_dora", False),
    }
    return tensors, config
