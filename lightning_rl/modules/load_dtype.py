"""The dtype a policy is loaded in: a LoRA base goes straight to the dtype the precision plugin stores it in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_rl.models import torch_dtype


def policy_load_dtype(dtype: str | torch.dtype, lora: Any, precision_plugin: Any) -> torch.dtype:
    """The dtype to load the policy's weights in.

    ``dtype`` (the module's setting), except for LoRA under a precision plugin that stores frozen weights in a
    narrower dtype (:class:`~lightning_rl.plugins.MemoryAwarePrecision`'s ``frozen_dtype``): the whole base is
    frozen, so it is loaded in that dtype. The weights end the same (one rounding either way), but an fp32 base
    would first sit on the device at twice its stored size while the plugin converts it: a Qwen2.5-1.5B base
    took 6.3 GiB there for 2.9 GiB kept. LoRA with ``modules_to_save`` (whole trainable copies, fp32 masters)
    keeps ``dtype``.

    Args:
        dtype: the module's ``dtype``.
        lora: the module's LoRA settings (None: full fine-tune, every weight an fp32 master).
        precision_plugin: the trainer's precision plugin (None before a trainer is attached).
    """
    wanted = torch_dtype(dtype)
    frozen = getattr(precision_plugin, "frozen_dtype", None)
    if lora is None or not isinstance(frozen, torch.dtype) or not frozen.is_floating_point:
        return wanted
    to_save = lora.get("modules_to_save") if isinstance(lora, Mapping) else getattr(lora, "modules_to_save", None)
    if to_save:
        return wanted
    return frozen if frozen.itemsize < wanted.itemsize else wanted


__all__ = ["policy_load_dtype"]
