"""How :class:`~lightning_rl.plugins.precision.MemoryAwarePrecision` stores a module's weights for training.

Trainable floating-point parameters become fp32 masters (autocast casts them per forward); frozen ones (the base
under LoRA, a frozen reference copy) take the compute dtype or a smaller one, or 8 or 4 bits through bitsandbytes
for frozen linear layers.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_rl.rollout.sharded_weights import is_dtensor

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
Quantize = Literal["int8", "nf4"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_BNB_AVAILABLE = RequirementCache("bitsandbytes")


def require_bitsandbytes() -> None:
    """Raise a clear error when bitsandbytes is missing."""
    if not _BNB_AVAILABLE:
        raise ModuleNotFoundError(
            "MemoryAwarePrecision(quantize=...) stores frozen weights in 8 or 4 bits with the 'bitsandbytes' "
            "package, which is not installed. Install it with `pip install bitsandbytes` (CUDA GPUs), or leave "
            "quantize=None to store frozen weights in bf16."
        )


def default_compute_dtype(device_type: str) -> torch.dtype:
    """bf16 where the device supports it, else fp16 (CUDA before Ampere)."""
    if device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def store_for_training(module: nn.Module, frozen_dtype: torch.dtype) -> None:
    """Trainable floating-point parameters of ``module`` to fp32, frozen ones to ``frozen_dtype``, in place.

    Raises:
        ValueError: a parameter FSDP2 already sharded in another dtype (its dtype is fixed once sharded).
    """
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_floating_point():
                continue
            dtype = torch.float32 if p.requires_grad else frozen_dtype
            if p.dtype == dtype:
                continue
            if is_dtensor(p):  # an FSDP2 shard: its dtype is fixed now
                raise ValueError(
                    f"a parameter sharded by FSDP2 is stored as {p.dtype}, but MemoryAwarePrecision keeps "
                    f"{'trainable' if p.requires_grad else 'frozen'} weights in {dtype}: shard after the "
                    "plugin's conversion (MemoryAwarePrecision.convert_before_sharding; lightning-rl's "
                    "modules do this in configure_model)")
            p.data = p.data.to(dtype)


def quantize_frozen_linears(module: nn.Module, quantize: Quantize, compute_dtype: torch.dtype) -> int:
    """Replace ``module``'s frozen ``nn.Linear`` layers (not the LM head) by bitsandbytes' 8- or 4-bit layers.

    The weights are quantized when the module moves to CUDA. Returns how many layers were replaced.
    """
    require_bitsandbytes()
    import bitsandbytes as bnb

    skip = set()
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is not None:
        skip.add(id(head))
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or id(child) in skip or name == "lm_head":
                continue
            if any(p.requires_grad for p in child.parameters()):
                continue
            has_bias = child.bias is not None
            w = child.weight.data.to(compute_dtype)
            if quantize == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=compute_dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, new)
            count += 1
    log.info("MemoryAwarePrecision: %d frozen linear layers stored in %s (quantized on the move to CUDA)",
             count, quantize)
    return count


__all__ = ["DTYPES", "DtypeName", "Quantize", "default_compute_dtype", "quantize_frozen_linears",
           "require_bitsandbytes", "store_for_training"]
