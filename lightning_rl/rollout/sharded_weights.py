"""The policy's full weights out of FSDP shards, one FSDP unit (FSDP1) or one tensor (FSDP2) at a time.

Lightning's ``FSDPStrategy`` wraps with torch's ``FullyShardedDataParallel`` (FSDP1): the parameters of each
wrapped unit (a decoder layer under an ``auto_wrap_policy``; the whole model without one) live flattened and
sharded, and :func:`fsdp1_parameters` gathers one unit at a time with ``summon_full_params(recurse=False)``.
``ModelParallelStrategy`` uses ``fully_shard`` (FSDP2): every parameter is a ``DTensor``, and
:func:`fsdp2_parameters` gathers one parameter at a time (``full_tensor()``).

Every gather is a collective: all processes must walk the same parameters in the same order, which they do
(the same model on every rank). A gathered tensor is valid until the iterator moves on; keep a copy to hold it.
Names come out as the policy's own (transformers or peft) names: the wrappers' ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.`` and ``_orig_mod.`` parts are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """``name`` without the parts FSDP, activation checkpointing and ``torch.compile`` wrappers add."""
    return _WRAPPER_PARTS.sub("", name)


def _fsdp1_class() -> type[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def fsdp1_units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``root``'s FSDP1 units with their module names, outermost first."""
    fsdp = _fsdp1_class()
    return [(name, m) for name, m in root.named_modules() if isinstance(m, fsdp)]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module, root: nn.Module | None = None) -> bool:
    """Whether ``model``'s parameters are sharded: FSDP1 units in ``root`` (default ``model``), or DTensors."""
    if torch.distributed.is_available() and fsdp1_units(root if root is not None else model):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def _module_path(root: nn.Module, model: nn.Module) -> str:
    if model is root:
        return ""
    for name, m in root.named_modules():
        if m is model:
            return clean_name(name + ".").removesuffix(".")
    raise ValueError(
        f"the policy ({type(model).__name__}) is not inside the FSDP-wrapped module given as root "
        f"({type(root).__name__}): pass the module the strategy wrapped (trainer.strategy.model)"
    )


def _overlaps(unit: str, policy: str) -> bool:
    """Whether a unit at path ``unit`` can hold parameters of the policy at path ``policy``."""
    return _within(unit, policy) or _within(policy, unit)


def _within(path: str, outer: str) -> bool:
    """Whether the module at ``path`` is the one at ``outer`` or inside it."""
    return path == outer or not outer or path.startswith(outer + ".")


def _own_parameters(unit: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters ``unit`` itself shards (not those of FSDP units inside it), once each, by module path."""
    fsdp, seen = _fsdp1_class(), set()
    stack: list[tuple[str, nn.Module]] = [("", unit)]
    while stack:
        prefix, module = stack.pop(0)
        for name, p in module._parameters.items():
            if p is None or id(p) in seen or getattr(p, "_is_flat_param", False):
                continue
            seen.add(id(p))
            yield prefix + name, p
        children = [(prefix + name + ".", child) for name, child in module._modules.items() if child is not None]
        stack[:0] = [(n, c) for n, c in children if not isinstance(c, fsdp)]


def fsdp1_parameters(model: nn.Module, root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name in model, full tensor)`` of ``model``'s parameters, gathering one FSDP1 unit of ``root`` at a time.

    Args:
        model: the policy, inside ``root``.
        root: the module holding the FSDP units (Lightning's ``trainer.strategy.model``).
    """
    fsdp = _fsdp1_class()
    policy = _module_path(root, model)
    for unit_name, unit in fsdp1_units(root):
        unit_path = clean_name(unit_name + ".").removesuffix(".") if unit_name else ""
        if not _overlaps(unit_path, policy):
            continue  # a unit of another model (a frozen reference, a value head): same skip on every rank
        with fsdp.summon_full_params(unit, recurse=False, writeback=False):
            for name, p in _own_parameters(unit):
                full = clean_name(".".join(x for x in (unit_path, name) if x))
                if policy and not full.startswith(policy + "."):
                    continue
                yield full[len(policy) + 1 if policy else 0 :], p.detach()


def full_numel(model: nn.Module, root: nn.Module | None = None) -> int:
    """Elements of ``model``'s parameters at their full (unsharded) size, without gathering anything.

    FSDP1 units hold their parameters' sizes in their flat parameter (torch's ``_fqns`` and ``_numels``, stable
    since torch 2.0); a DTensor's ``numel()`` is its full size already.
    """
    root = model if root is None else root
    units = fsdp1_units(root)
    if not units:
        return sum(p.numel() for p in model.parameters())
    policy, total = _module_path(root, model), 0
    for unit_name, unit in units:
        flat = getattr(unit, "_flat_param", None)
        if flat is None:
            continue
        unit_path = clean_name(unit_name + ".").removesuffix(".") if unit_name else ""
        for fqn, numel in zip(flat._fqns, flat._numels, strict=True):
            full = clean_name(".".join(x for x in (unit_path, fqn) if x))
            if not policy or full.startswith(policy + "."):
                total += int(numel)
    return total


def fsdp2_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of ``model``'s parameters, gathering one DTensor at a time."""
    for name, p in model.named_parameters():
        yield clean_name(name), (p.full_tensor() if is_dtensor(p) else p).detach()


def gathered_parameters(model: nn.Module, root: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of every parameter of ``model``: FSDP1 units of ``root``, DTensors, or plain.

    Args:
        model: the policy.
        root: the module that holds FSDP1 units around ``model`` (Lightning wraps the LightningModule, so the
            policy's outer parameters live in a unit above it); default ``model``.
    """
    root = model if root is None else root
    if fsdp1_units(root):
        yield from fsdp1_parameters(model, root)
    else:
        yield from fsdp2_parameters(model)


__all__ = [
    "clean_name",
    "fsdp1_parameters",
    "fsdp1_units",
    "fsdp2_parameters",
    "full_numel",
    "gathered_parameters",
    "is_dtensor",
    "is_sharded",
]
