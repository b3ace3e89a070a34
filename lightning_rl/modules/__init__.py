"""The RL LightningModules."""

from lightning_rl.modules.dpo import DPO
from lightning_rl.modules.experience import Experience, PolicyOutput
from lightning_rl.modules.grpo import GRPO
from lightning_rl.modules.kto import KTO
from lightning_rl.modules.on_policy import OnPolicyModule
from lightning_rl.modules.orpo import ORPO
from lightning_rl.modules.policy import NonFiniteLossError, PolicyModule
from lightning_rl.modules.ppo import PPO
from lightning_rl.modules.preference import PreferenceModule
from lightning_rl.modules.value_head import ValueHead

__all__ = ["DPO", "GRPO", "KTO", "ORPO", "PPO", "Experience", "NonFiniteLossError", "OnPolicyModule", "PolicyModule",
           "PolicyOutput", "PreferenceModule", "ValueHead"]
