"""Whether a LoRA policy's frozen base can be an engine process's merged weights for this module.

:class:`~lightning_rl.callbacks.VLLMRollout` asks before it starts the engine
(``EngineSettings.share_merged_base``: None turns sharing on where this finds nothing against it, True raises what
it finds). The engine merges the adapters into those weights once per sync, so every forward of the update must
read the adapters of the last sync: one optimizer step per rollout, and no adapter-disabled reference model (it
would read the merged weights, not the base).
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_rl.rollout.merged_base import merged_base_unsupported_reason
from lightning_rl.rollout.shared_weights import frozen_base_parameters


def merged_base_refusal(pl_module: L.LightningModule, engine_dtype: torch.dtype | None = None) -> str | None:
    """Why ``pl_module``'s LoRA base cannot be the engine's merged weights (None when it can).

    Args:
        pl_module: the training module (its ``policy``, ``needs_reference_model``, ``num_iterations`` and
            ``num_mini_batches``).
        engine_dtype: the engine's weight dtype; when given, the frozen base must be held in it already.
    """
    reason = merged_base_unsupported_reason(pl_module.policy)
    if reason:
        return reason
    if getattr(pl_module, "needs_reference_model", False):
        return "the adapter-disabled reference model (beta > 0) would read the merged weights, not the base"
    steps = int(getattr(pl_module, "num_iterations", 1) or 1) * int(getattr(pl_module, "num_mini_batches", 1) or 1)
    if steps > 1:
        return (f"the module takes {steps} optimizer steps per rollout (num_iterations x num_mini_batches), and "
                "the engine merges the adapters once a step")
    if engine_dtype is not None:
        other = {p.dtype for p in frozen_base_parameters(pl_module.policy).values()} - {engine_dtype}
        if other:
            return (f"the trainer keeps the frozen base in {sorted(map(str, other))}, the engine in {engine_dtype} "
                    "(MemoryAwarePrecision keeps frozen weights in the engine's 16-bit dtype)")
    return None


def check_merged_base_module(pl_module: L.LightningModule) -> None:
    """Raise ValueError naming :func:`merged_base_refusal`'s reason (``share_merged_base=True`` was asked for)."""
    reason = merged_base_refusal(pl_module)
    if reason:
        raise ValueError(f"share_merged_base=True is impossible here: {reason}; use share_merged_base=False (or "
                         "None: shared when possible)")


__all__ = ["check_merged_base_module", "merged_base_refusal"]
