"""Which Lightning strategies can shard a policy trained with manual optimization, and FSDP2 sharding for them.

Every lightning-rl module optimizes manually: ``training_step`` calls backward itself. Lightning's
``FSDPStrategy`` (torch FSDP1) runs ``training_step`` inside the root unit's forward, so a backward there
finds the root unit still in its forward state and fails ("Expects BACKWARD_PRE or BACKWARD_POST state"),
Lightning-AI/pytorch-lightning#19685. ``ModelParallelStrategy`` (FSDP2) leaves ``training_step`` alone and
hands the module a device mesh in ``configure_model``, where :func:`fully_shard_policy` shards each decoder
layer and then the whole model over the mesh's data-parallel dimension.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_rl.compiled_layers import decoder_layers
from lightning_rl.models import is_fully_sharded, unwrap
from lightning_rl.rollout.sharded_weights import is_dtensor
from lightning_rl.tensor_norms import sum_of_squares

FSDP1_REFUSED = (
    "Lightning's FSDPStrategy (torch FSDP1) cannot train lightning-rl's modules: they optimize manually "
    "(backward inside training_step), which FSDP1 under Lightning does not support "
    "(Lightning-AI/pytorch-lightning#19685). Use strategy='ddp' when the policy and its optimizer states fit "
    "one GPU, or ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1) to shard them with "
    "FSDP2 (the module shards its decoder layers itself)"
)


def check_strategy(strategy: Any) -> None:
    """Refuse a strategy that cannot run manual optimization on a sharded policy (see the module docstring).

    Raises:
        ValueError: Lightning's ``FSDPStrategy``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(FSDP1_REFUSED)


def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (the module shards with FSDP2)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel part of ``ModelParallelStrategy``'s mesh (tensor-parallel training is not supported).

    Raises:
        ValueError: a mesh with a tensor-parallel dimension larger than one.
    """
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"lightning-rl shards the policy with FSDP2 over the data-parallel dimension only, but the device mesh "
            f"has tensor_parallel size {mesh['tensor_parallel'].size()}: use ModelParallelStrategy("
            "data_parallel_size=<GPUs>, tensor_parallel_size=1) (tensor-parallel generation is "
            "EngineSettings(tensor_parallel_size=...) on VLLMRollout)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def fully_shard_policy(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` with FSDP2: each decoder layer is one unit (gathered for its own forward), then the rest.

    Idempotent. Frozen weights (a LoRA base) are sharded too; only trainable ones get gradients.

    Args:
        model: a transformers causal LM or a peft wrapper of one.
        mesh: ``ModelParallelStrategy``'s device mesh (its data-parallel dimension is used).

    Returns:
        ``model``, whose transformers model is now an ``FSDPModule`` with ``DTensor`` shards as parameters.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fully_sharded(model):
        return model
    dp = data_parallel_mesh(mesh)
    net = unwrap(model)  # under peft: the transformers model (peft's forward and generate reach its forward)
    for layer in decoder_layers(net):
        fully_shard(layer, mesh=dp)
    fully_shard(net, mesh=dp)
    return model


def gradient_norm(grads: list[torch.Tensor], device: torch.device, held_squares: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The L2 norm of all of ``grads`` together, as a plain tensor on ``device``.

    FSDP2 gradients are ``DTensor`` shards: their local squared norms are summed over the shards' (one-
    dimensional, data-parallel) mesh in one all-reduce; plain gradients are complete on every process.
    ``held_squares`` adds the squared norms of gradients kept elsewhere (host memory) for this process.
    """
    squares = torch.zeros((), device=device, dtype=torch.float32)
    if held_squares is not None:
        squares = squares + held_squares.to(device)
    plain = [g for g in grads if not is_dtensor(g)]
    sharded = [g for g in grads if is_dtensor(g)]
    if plain:
        squares = squares + sum_of_squares(plain).to(device)
    if sharded:
        local = sum_of_squares([g.to_local() for g in sharded])
        mesh = sharded[0].device_mesh
        if mesh.size() > 1:
            dist.all_reduce(local, group=mesh.get_group())
        squares = squares + local.to(device)
    return squares.sqrt()
