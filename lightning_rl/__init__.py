"""lightning-rl: reinforcement-learning fine-tuning of language models with PyTorch Lightning."""

from lightning_rl.callbacks import CompletionSamples, RLProgressBar, RunReport, VLLMRollout
from lightning_rl.data import ArithmeticDataModule, PreferenceDataModule, PromptDataModule
from lightning_rl.models import load_policy
from lightning_rl.modules import DPO, GRPO, KTO, ORPO, PPO, OnPolicyModule, PolicyModule
from lightning_rl.plugins import MemoryAwarePrecision
from lightning_rl.rollout import EngineSettings, HFEngine, Rollout, RolloutEngine, SamplingConfig
from lightning_rl.rollout.vllm import VLLMEngine  # imports vllm only when an engine is created

__version__ = "0.1.0"

__all__ = [
    "DPO",
    "GRPO",
    "KTO",
    "ORPO",
    "PPO",
    "ArithmeticDataModule",
    "CompletionSamples",
    "EngineSettings",
    "HFEngine",
    "MemoryAwarePrecision",
    "OnPolicyModule",
    "PolicyModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RLProgressBar",
    "Rollout",
    "RolloutEngine",
    "RunReport",
    "SamplingConfig",
    "VLLMEngine",
    "VLLMRollout",
    "load_policy",
]
