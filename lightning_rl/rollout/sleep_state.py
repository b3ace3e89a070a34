"""Where the colocated vLLM engine's memory is, and whether it holds the policy's weights: one small state object."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Memory(StrEnum):
    """Where the engine's device memory is.

    Attributes:
        AWAKE: weights and KV cache on the device.
        KV_RELEASED: only the KV cache was released (sleep level 0, or base weights shared with the trainer);
            the weights stay on the device.
        ASLEEP: vLLM's own sleep (level 1 or 2) released the weights and the KV cache.
        WEIGHTS_AWAKE: the weights came back from vLLM's sleep; the KV cache is still asleep (it comes back
            at the next ``generate``).
    """

    AWAKE = "awake"
    KV_RELEASED = "kv_released"
    ASLEEP = "asleep"
    WEIGHTS_AWAKE = "weights_awake"


@dataclass
class SleepState:
    """The engine's sleep state.

    Args:
        memory: where the engine's memory is.
        weights_synced: the engine holds the policy's weights (False until the first sync, and after a level-2
            sleep dropped them; with LoRA adapter sync, False means the base weights must be pushed again too).
    """

    memory: Memory = Memory.AWAKE
    weights_synced: bool = False

    @property
    def is_sleeping(self) -> bool:
        """Part of the engine's memory is released."""
        return self.memory is not Memory.AWAKE


__all__ = ["Memory", "SleepState"]
