"""Optional LoRA adapters through peft, from a ``LoraConfig`` or a plain mapping (YAML)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

DEFAULT_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def lora_config(spec: LoraConfig | Mapping[str, Any]) -> LoraConfig:
    """Turn a mapping (``{"r": 16, ...}``) into a causal-LM ``LoraConfig``; defaults fill the rest."""
    if isinstance(spec, LoraConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"lora must be a peft LoraConfig or a mapping of its fields, got {type(spec).__name__}")
    kwargs = {**DEFAULT_LORA, **dict(spec)}
    kwargs.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**kwargs)
    except TypeError as err:
        raise TypeError(f"invalid lora settings {dict(spec)}: {err}") from err


def apply_lora(model: PreTrainedModel, spec: LoraConfig | Mapping[str, Any] | None) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` with LoRA adapters (base weights frozen), or return it unchanged for ``None``."""
    if spec is None:
        return model
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(spec))


def is_lora(model: object) -> bool:
    """Whether ``model`` carries peft adapters."""
    return isinstance(model, PeftModel)
