"""Optional LoRA adapters through peft, from a ``LoraConfig`` or a plain mapping (YAML)."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

#: LoRA settings as other libraries and papers name them, and peft's names for them.
_LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
                 "target": "target_modules", "modules": "target_modules"}
DEFAULT_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def lora_config(spec: LoraConfig | Mapping[str, Any]) -> LoraConfig:
    """Turn a mapping (``{"r": 16, ...}``) into a causal-LM ``LoraConfig``; defaults fill the rest."""
    if isinstance(spec, LoraConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"lora must be a peft LoraConfig or a mapping of its fields, got {type(spec).__name__}")
    kwargs = {**DEFAULT_LORA, **dict(spec)}
    kwargs.setdefault("task_type", "CAUSAL_LM")
    fields = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)"
                 if (close := [_LORA_ALIASES[k]] if k in _LORA_ALIASES else difflib.get_close_matches(k, fields, n=1))
                 else repr(k) for k in unknown]
        raise TypeError(f"invalid lora settings {dict(spec)}: peft's LoraConfig has no field {', '.join(hints)}; "
                        "its fields include r, lora_alpha, lora_dropout, target_modules, bias, use_rslora, use_dora")
    try:
        return LoraConfig(**kwargs)
    except TypeError as err:
        raise TypeError(f"invalid lora settings {dict(spec)}: {err}") from err


def apply_lora(model: PreTrainedModel, spec: LoraConfig | Mapping[str, Any] | None) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` with LoRA adapters (base weights frozen), or return it unchanged for ``None``.

    Raises:
        ValueError: ``target_modules`` names no layer of ``model``; the message lists the names it has.
    """
    if spec is None:
        return model
    config = lora_config(spec)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
            if "not found in the base model" not in str(err):
                raise
            raise ValueError(
                f"lora target_modules={config.target_modules!r} names no layer of this model; its linear layers are "
                f"{linear_layer_names(model)} (or give target_modules='all-linear')"
            ) from err


def linear_layer_names(model: Any) -> list[str]:
    """The distinct last names of ``model``'s ``nn.Linear`` layers (``q_proj``, ``up_proj``, ...), head excluded."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


def is_lora(model: object) -> bool:
    """Whether ``model`` carries peft adapters."""
    return isinstance(model, PeftModel)
