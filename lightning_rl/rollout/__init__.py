"""Rollout engines: the protocol, the transformers default, and (optional) vLLM with its settings."""

from lightning_rl.rollout.engine import Rollout, RolloutEngine, SamplingConfig
from lightning_rl.rollout.hf import HFEngine
from lightning_rl.rollout.vllm_settings import EngineSettings

__all__ = ["EngineSettings", "HFEngine", "Rollout", "RolloutEngine", "SamplingConfig"]
