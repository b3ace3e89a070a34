"""The RL LightningModules."""

from lightning_rl.modules.grpo import GRPO
from lightning_rl.modules.policy import NonFiniteLossError, PolicyModule

__all__ = ["GRPO", "NonFiniteLossError", "PolicyModule"]
