"""Plain copies of models that FSDP2 shards: to write a policy out (``module.export`` and ``save_policy`` after a
fit under ``ModelParallelStrategy``), and to keep a sharded frozen reference's weights in a checkpoint.

A sharded policy cannot be written as it is: ``copy.deepcopy`` refuses an FSDP module, and its parameters are
``DTensor`` shards that safetensors cannot store. :func:`unsharded_copy` gathers each weight from the shards, one at
a time, into a CPU copy of the same architecture (a peft model keeps its adapters) on the first process;
:func:`written_once` runs the write there while the other processes wait. :func:`full_state_dict` and
:func:`load_full_state_dict` move a state dict of full CPU tensors out of and into a model, sharded or not (the first
process alone writes a checkpoint's metadata, so it must hold whole tensors, not its shards).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lightning_rl.lora import is_lora
from lightning_rl.models import is_fully_sharded, unwrap
from lightning_rl.rollout.sharded_weights import is_dtensor

T = TypeVar("T")


def _first_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _plain_class(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` had before ``fully_shard`` made it an ``FSDPModule`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _empty_twin(policy: nn.Module) -> nn.Module:
    """A CPU model of ``policy``'s architecture (its peft adapters too), its weights to be loaded."""
    base = unwrap(policy)
    twin = _plain_class(base)._from_config(copy.deepcopy(base.config))
    if is_lora(policy):
        from peft import get_peft_model

        name = policy.active_adapter
        twin = get_peft_model(twin, copy.deepcopy(policy.peft_config[name]), adapter_name=name)
    return twin


def unsharded_copy(policy: nn.Module) -> nn.Module | None:
    """A hook-free CPU copy of the FSDP2-sharded ``policy`` with its full weights, each in its own dtype.

    Collective: every process of the run must call it, in the same order (each weight is gathered from the shards,
    one at a time). Only the first process gets the copy; the others get None.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in policy.modules():  # a unit gathered by a forward holds full copies that may predate a step
        if isinstance(module, FSDPModule):
            module.reshard()
    state = full_state_dict(policy, keep=_first_process())
    if state is None:
        return None
    twin = _empty_twin(policy)
    twin.load_state_dict(state, strict=True, assign=True)
    if getattr(unwrap(twin).config, "tie_word_embeddings", False):
        unwrap(twin).tie_weights()
    return twin.eval()


def written_once(policy: nn.Module, write: Callable[[nn.Module], T], written: T) -> T:
    """``write(policy)``; for an FSDP2-sharded policy, ``write`` of its :func:`unsharded_copy` on the first process,
    the others waiting until it is done (they return ``written``).
    """
    if not is_fully_sharded(policy):
        return write(policy)
    whole = unsharded_copy(policy)
    try:
        return write(whole) if whole is not None else written
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict as full CPU tensors; each ``DTensor`` shard gathered (collective, every process).

    A tied weight is gathered and copied once and appears under each of its names. With ``keep=False`` the
    process joins the gathers but copies and returns nothing (None).
    """
    values = model.state_dict(keep_vars=True)  # the parameters themselves: a tied weight appears as one
    full: dict[int, torch.Tensor | None] = {}
    for value in values.values():
        if id(value) not in full:
            whole = (value.full_tensor() if is_dtensor(value) else value).detach()
            full[id(value)] = whole.to("cpu", copy=True) if keep else None
    return {name: full[id(value)] for name, value in values.items()} if keep else None


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (:func:`full_state_dict`'s) into ``model``; a ``DTensor`` shard takes its own slice.

    Every process holds the whole ``state``, so each cuts its slice without communication.

    Raises:
        KeyError: ``state`` and the model's state dict do not name the same entries.
    """
    from torch.distributed.tensor import distribute_tensor

    current = model.state_dict(keep_vars=True)
    if current.keys() != state.keys():
        missing, unexpected = sorted(current.keys() - state.keys()), sorted(state.keys() - current.keys())
        raise KeyError(f"the saved weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in current.items():
            full = state[name].to(value.device, value.dtype)
            if is_dtensor(value):
                full = distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None).to_local()
                value = value.to_local()
            value.copy_(full)


__all__ = ["full_state_dict", "load_full_state_dict", "unsharded_copy", "written_once"]
