"""What a colocated rollout engine takes from the device: the object a rollout callback registers with the plugin.

:class:`~lightning_rl.callbacks.VLLMRollout` registers itself at ``setup`` through
:meth:`MemoryAwarePrecision.register_rollout <lightning_rl.plugins.MemoryAwarePrecision.register_rollout>`; the
plugin asks it for a :class:`RolloutMemory` when it plans (after ``configure_model``, once the policy exists).
The plugin knows nothing else about the callback or its engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lightning_rl.shapes import TrainingShape


@dataclass(frozen=True)
class RolloutMemory:
    """Device memory of a rollout engine that shares the device with training (bytes).

    Args:
        engine_weight_bytes: the engine's copy of the policy's weights while it is awake, less what it shares
            with the trainer (a LoRA base the trainer's frozen weights point at counts once, as frozen weights).
        weights_kept_asleep_bytes: the part of those weights that stays on the device while the engine sleeps
            (it counts in the train phase too).
        kv_bytes_per_token: KV-cache bytes per token in the engine's dtype.
        kv_tokens: KV-cache tokens of one rollout; 0 when unknown (the plan then gives the engine what is left).
        headroom: multiplier on ``kv_tokens * kv_bytes_per_token``.
        sized_by_gpu_fraction: the engine takes a fixed fraction of the device (vLLM's
            ``gpu_memory_utilization``): the plan has no KV budget to give and plans no rollout phase.
        beside_training_bytes: what an engine that generates during the update (in a process of its own) holds
            while training runs: its weights, KV cache and process; counted in the train phase.
        min_kv_tokens: KV-cache tokens of one whole sequence. With at least that much, the engine can generate
            the rollout in waves when the plan has no room for all of it (0: it cannot).
    """

    engine_weight_bytes: int
    weights_kept_asleep_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_tokens: int = 0
    headroom: float = 1.2
    sized_by_gpu_fraction: bool = False
    beside_training_bytes: int = 0
    min_kv_tokens: int = 0


@runtime_checkable
class RolloutMemoryProvider(Protocol):
    """Something that runs a rollout engine beside training and can say what it needs."""

    def rollout_memory(self, shape: TrainingShape) -> RolloutMemory:
        """The engine's needs for a module of this ``shape`` (called when the plugin plans)."""
        ...


__all__ = ["RolloutMemory", "RolloutMemoryProvider"]
