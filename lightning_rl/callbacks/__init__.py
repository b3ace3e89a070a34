"""Lightning callbacks: the colocated vLLM rollout toggle."""

from lightning_rl.callbacks.rollout import VLLMRollout

__all__ = ["VLLMRollout"]
