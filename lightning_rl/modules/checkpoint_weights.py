"""Which weights a checkpoint holds: the trained ones, and frozen ones only where their source cannot rebuild them.

A LoRA policy's frozen base (and a separate critic's) comes back from the model source when the
module is rebuilt (``configure_model``), so checkpoints leave it out: a SmolLM2-135M LoRA checkpoint
holds the adapters, not 540 MB of base weights. A fingerprint of the left-out weights is stored and
checked on load, so a source whose weights changed since training is refused instead of silently
mixed with the adapters. The tiny random test models cannot be rebuilt (their weights depend on the
random state), so their checkpoints keep everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_rl.models import TINY_CONFIGS
from lightning_rl.rollout.sharded_weights import is_dtensor

# state-dict prefix -> attribute naming the source its frozen weights are rebuilt from
SOURCE_ATTRIBUTES = {"policy.": "model_source", "critic.": "critic_model"}
# strategies whose checkpoints hold the module's plain state dict (sharded ones write their own layout)
PLAIN_STATE_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def rebuildable(source: Any) -> bool:
    """Whether loading ``source`` again gives the same weights (a file, directory, hub id, the embedded model)."""
    return isinstance(source, str) and source not in TINY_CONFIGS


def rebuildable_frozen_keys(module: nn.Module) -> list[str]:
    """Names of frozen parameters (tied ones under each name) that ``module``'s model sources rebuild on load."""
    prefixes = tuple(p for p, attr in SOURCE_ATTRIBUTES.items() if rebuildable(getattr(module, attr, None)))
    if not prefixes:
        return []
    return [n for n, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and n.startswith(prefixes)]


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[K, 2]`` float64 sum and absolute sum of each tensor rounded to bf16 (the same for fp32 and bf16 copies)."""
    rows = []
    for t in tensors:
        t = t.full_tensor() if is_dtensor(t) else t  # a sharded reference's weight, gathered (every process)
        x = t.detach().to(torch.bfloat16)
        rows.append(torch.stack([x.sum(dtype=torch.float64), x.abs().sum(dtype=torch.float64)]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def drop_rebuildable(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Remove the frozen weights the sources rebuild from ``state_dict``; returns what loading needs to check them.

    Only for checkpoints that hold the plain state dict (no trainer, one device or DDP).
    """
    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    if strategy is not None and type(strategy).__name__ not in PLAIN_STATE_STRATEGIES:
        return None
    keys = [k for k in rebuildable_frozen_keys(module) if k in state_dict]
    if not keys:
        return None
    info = {"keys": keys, "fingerprint": fingerprint([state_dict[k] for k in keys])}
    for k in keys:
        del state_dict[k]
    return info


def restore_rebuilt(module: nn.Module, state_dict: dict[str, torch.Tensor], info: Mapping[str, Any] | None) -> None:
    """Put ``module``'s rebuilt frozen weights back into ``state_dict``, after checking they are the trained ones."""
    if not info:
        return
    own = module.state_dict()
    keys = list(info["keys"])
    missing = [k for k in keys if k not in own]
    sources = {p: getattr(module, a, None) for p, a in SOURCE_ATTRIBUTES.items()
               if any(k.startswith(p) for k in keys)}
    where = ", ".join(f"{a}={sources[p]!r}" for p, a in SOURCE_ATTRIBUTES.items() if p in sources)
    if missing:
        raise ValueError(
            f"the checkpoint left out {len(keys)} frozen weights to be rebuilt from {where}, but the rebuilt model has "
            f"no {missing[:3]}: load it with the same model and lora settings it was trained with"
        )
    got = fingerprint([own[k] for k in keys])
    want = info["fingerprint"]
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=1e-6):
        bad = [k for k, a, b in zip(keys, got, want) if not torch.allclose(a, b, rtol=1e-6, atol=1e-6)]
        raise ValueError(
            f"the frozen base weights rebuilt from {where} differ from the ones this checkpoint was trained on "
            f"({len(bad)} of {len(keys)} tensors, e.g. {bad[:2]}): the model at that source changed. Point the "
            "model argument at the original weights, e.g. Module.load_from_checkpoint(path, model='/path/to/base')"
        )
    state_dict.update({k: own[k] for k in keys})


def reference_fingerprint(reference: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of a frozen reference its model source rebuilds: names and :func:`fingerprint`."""
    state = reference.state_dict()
    keys = [k for k, v in state.items() if v.is_floating_point()]
    return {"keys": keys, "fingerprint": fingerprint([state[k] for k in keys])}


def check_reference(reference: nn.Module, info: Mapping[str, Any] | None, source: Any) -> None:
    """Refuse a rebuilt frozen reference whose weights are not the ones the checkpoint was trained against.

    The reference of a full fine-tune (the KL term's, or a preference loss's) is loaded again from ``source``
    rather than stored; a source whose weights changed since (an export written over it, a new revision) would
    otherwise change the objective of the resumed run without a word.
    """
    if not info:
        return
    got = reference_fingerprint(reference)
    want = info["fingerprint"]
    same = got["keys"] == list(info["keys"]) and got["fingerprint"].shape == want.shape
    if same and torch.allclose(got["fingerprint"], want, rtol=1e-6, atol=1e-6):
        return
    raise ValueError(
        f"the frozen reference model rebuilt from model={source!r} differs from the one this checkpoint was trained "
        "against: the model at that source changed. Point the model argument at the original weights, e.g. "
        "Module.load_from_checkpoint(path, model='/path/to/original') or model: in the resumed run's config"
    )
