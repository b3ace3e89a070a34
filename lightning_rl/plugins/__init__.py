"""Precision plugins: low-precision frozen weights, fp32 masters, a memory plan and optimizer offloading."""

from lightning_rl.plugins.fsdp_precision import MemoryAwareFSDPPrecision
from lightning_rl.plugins.memory_plan import MemoryPlan, MemoryPlanError, ModelMemory, RolloutNeeds, plan_memory
from lightning_rl.plugins.offload import OptimizerOffloader
from lightning_rl.plugins.precision import MemoryAwarePrecision

__all__ = [
    "MemoryAwareFSDPPrecision",
    "MemoryAwarePrecision",
    "MemoryPlan",
    "MemoryPlanError",
    "ModelMemory",
    "OptimizerOffloader",
    "RolloutNeeds",
    "plan_memory",
]
