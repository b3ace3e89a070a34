"""lightning-rl: reinforcement-learning fine-tuning of language models with PyTorch Lightning."""

from lightning_rl.data import ArithmeticDataModule, PromptDataModule
from lightning_rl.models import load_policy
from lightning_rl.modules import GRPO, PolicyModule
from lightning_rl.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "GRPO",
    "ArithmeticDataModule",
    "HFEngine",
    "PolicyModule",
    "PromptDataModule",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "load_policy",
]
