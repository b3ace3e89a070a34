"""Precision plugins: low-precision frozen weights, fp32 masters, a memory plan, optimizer offloading and streaming."""

from lightning_rl.plugins.fsdp_precision import MemoryAwareFSDPPrecision
from lightning_rl.plugins.memory_plan import MemoryPlan, MemoryPlanError, ModelMemory, RolloutNeeds, plan_memory
from lightning_rl.plugins.offload import OptimizerOffloader
from lightning_rl.plugins.precision import MemoryAwarePrecision
from lightning_rl.plugins.streamed_states import StreamedOptimizerStates, UnsupportedOptimizerError

__all__ = [
    "MemoryAwareFSDPPrecision",
    "MemoryAwarePrecision",
    "MemoryPlan",
    "MemoryPlanError",
    "ModelMemory",
    "OptimizerOffloader",
    "RolloutNeeds",
    "StreamedOptimizerStates",
    "UnsupportedOptimizerError",
    "plan_memory",
]
