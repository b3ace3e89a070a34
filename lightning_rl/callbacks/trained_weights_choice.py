"""Whether a fully fine-tuned policy's 16-bit weights can be an engine process's own weights for this module.

:class:`~lightning_rl.callbacks.VLLMRollout` asks before it starts the engine (``EngineSettings.share_trained_weights``:
None turns sharing on where this finds nothing against it, True raises what it finds). Each optimizer step's results
wait in host memory until the next sync copies them into the engine's weights, so every forward of the update must
come after a sync: one optimizer step per rollout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch

from lightning_rl.rollout.shared_trained_weights import trained_weights_unsupported_reason

if TYPE_CHECKING:
    from lightning_rl.plugins.host_masters import HostMasterWeights


def trained_weights_refusal(
    pl_module: L.LightningModule, masters: HostMasterWeights | None, engine_dtype: torch.dtype | None = None
) -> str | None:
    """Why ``pl_module``'s trained weights cannot be the engine process's (None when they can, layouts aside).

    Args:
        pl_module: the training module (its ``policy``, ``num_iterations`` and ``num_mini_batches``).
        masters: the precision plugin's host masters (None without them).
        engine_dtype: the engine's weight dtype; when given, the trainer's 16-bit weights must be in it.
    """
    reason = trained_weights_unsupported_reason(pl_module.policy, masters)
    if reason:
        return reason
    steps = int(getattr(pl_module, "num_iterations", 1) or 1) * int(getattr(pl_module, "num_mini_batches", 1) or 1)
    if steps > 1:
        return (f"the module takes {steps} optimizer steps per rollout (num_iterations x num_mini_batches), and "
                "the engine's weights take each step's results only at the next sync")
    if engine_dtype is not None and masters is not None and masters.dtype != engine_dtype:
        return f"the trainer keeps its weights in {masters.dtype}, the engine in {engine_dtype}"
    return None


__all__ = ["trained_weights_refusal"]
