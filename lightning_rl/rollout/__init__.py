"""Rollout engines: the protocol, the transformers default, and (optional) vLLM."""

from lightning_rl.rollout.engine import Rollout, RolloutEngine, SamplingConfig
from lightning_rl.rollout.hf import HFEngine

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingConfig"]
