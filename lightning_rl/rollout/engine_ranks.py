"""Where this process's vLLM engine sits among the trainer's processes: its rank, GPU and tensor-parallel group.

Under Lightning's DDP or FSDP (one process per GPU, ``torch.distributed`` initialised by Lightning) every
process runs one engine in vLLM's external-launcher mode. With ``tensor_parallel_size = T`` the processes form
groups of ``T`` consecutive ranks (``[0..T-1], [T..2T-1], ...``) whose engines hold one shard each of the same
model and generate the group's prompts together. Everything here is plain Python on ranks, except
:meth:`EngineRanks.current` (reads ``torch.distributed`` and the CUDA device) and :func:`new_tp_group`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def tp_groups(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """The tensor-parallel groups of ``world_size`` ranks: consecutive runs of ``tensor_parallel_size`` ranks.

    Raises:
        ValueError: ``tensor_parallel_size`` is below 1 or does not divide ``world_size``.
    """
    check_tensor_parallel(tensor_parallel_size, world_size, distributed=True)
    t = tensor_parallel_size
    return [list(range(start, start + t)) for start in range(0, world_size, t)]


def check_tensor_parallel(tensor_parallel_size: int, world_size: int, distributed: bool) -> None:
    """Raise a ``ValueError`` naming the fix when ``tensor_parallel_size`` cannot work with these processes.

    Args:
        tensor_parallel_size: GPUs (processes) one engine is sharded over.
        world_size: the trainer's processes (1 without ``torch.distributed``).
        distributed: ``torch.distributed`` is initialised (Lightning's DDP/FSDP strategies do it).
    """
    t = tensor_parallel_size
    if t < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {t}")
    if t == 1:
        return
    if not distributed:
        raise ValueError(
            f"tensor_parallel_size={t} shards the engine over {t} processes, one per GPU, and this process runs "
            f"alone (torch.distributed is not initialised): train with Trainer(accelerator='gpu', devices={t} "
            "or more, strategy='ddp' or 'fsdp'), or set tensor_parallel_size=1"
        )
    if world_size % t:
        raise ValueError(
            f"tensor_parallel_size={t} must divide the number of processes ({world_size}): each group of {t} "
            f"consecutive ranks shares one engine; use devices * num_nodes that is a multiple of {t}, or a "
            "tensor_parallel_size that divides it"
        )


@dataclass(frozen=True)
class EngineRanks:
    """Where the engine of this process sits among the engines.

    Args:
        rank: global rank of this process.
        world_size: number of processes.
        device_index: the CUDA device this process trains (and generates) on.
        tensor_parallel_size: processes that share one engine.
        distributed: ``torch.distributed`` is initialised (the engine then runs in external-launcher mode).
    """

    rank: int = 0
    world_size: int = 1
    device_index: int = 0
    tensor_parallel_size: int = 1
    distributed: bool = False

    def __post_init__(self) -> None:
        check_tensor_parallel(self.tensor_parallel_size, self.world_size, self.distributed)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size} processes")

    @classmethod
    def current(cls, tensor_parallel_size: int = 1) -> EngineRanks:
        """The ranks of this process from ``torch.distributed``, and its CUDA device (when initialised)."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else 0
        world = torch.distributed.get_world_size() if dist else 1
        device = torch.cuda.current_device() if dist and torch.cuda.is_available() else 0  # read by vLLM then
        return cls(rank, world, device, tensor_parallel_size, dist)

    @property
    def group_index(self) -> int:
        """Which tensor-parallel group this process is in."""
        return self.rank // self.tensor_parallel_size

    @property
    def rank_in_group(self) -> int:
        """Position of this process in its tensor-parallel group."""
        return self.rank % self.tensor_parallel_size

    @property
    def external_launcher(self) -> bool:
        """The engine joins the trainer's processes (vLLM's ``external_launcher`` backend)."""
        return self.distributed

    def launcher_env(self) -> dict[str, str]:
        """The variables vLLM's external launcher reads: this rank, and the GPU as ``LOCAL_RANK``.

        ``LOCAL_RANK`` is the CUDA device index the trainer uses, so a run on ``devices=[2, 3]`` generates on
        GPUs 2 and 3 (vLLM puts its worker on ``cuda:<LOCAL_RANK>``).
        """
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.device_index), "WORLD_SIZE": str(self.world_size)}

    def llm_kwargs(self) -> dict[str, Any]:
        """``vllm.LLM`` arguments for this placement (none for a lone process: vLLM's one-GPU executor)."""
        if not self.external_launcher:
            return {}
        return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": self.tensor_parallel_size}


def new_tp_group(ranks: EngineRanks) -> Any:
    """The process group of this process's tensor-parallel group (None for ``tensor_parallel_size=1``).

    Every process must call it (``torch.distributed`` creates groups collectively), in the same order as the
    other groups it creates.
    """
    if ranks.tensor_parallel_size == 1:
        return None
    groups = tp_groups(ranks.world_size, ranks.tensor_parallel_size)
    group, _ = torch.distributed.new_subgroups_by_enumeration(groups, backend="gloo")  # it gathers Python lists
    return group


__all__ = ["EngineRanks", "check_tensor_parallel", "new_tp_group", "tp_groups"]
