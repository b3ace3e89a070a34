"""A fully fine-tuned policy whose 16-bit weights are the engine process's: one copy of them on the GPU.

With :class:`~lightning_rl.plugins.host_masters.HostMasterWeights` (``MemoryAwarePrecision``'s host masters) the
trainer's linear weights and embeddings are bf16 copies of fp32 masters in host memory, written only by the
optimizer step; an engine in its own process (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`) holds
the same bf16 values after each sync. Sharing points those trainer parameters at views of the engine's weights
(CUDA IPC; packed ``qkv``/``gate_up`` rows) and frees the trainer's copy: about 0.9 GiB for the Qwen2.5-0.5B shape.

The engine generates the next rollout from those weights while the update runs, so the optimizer step must not
write them: their stepped values wait in pinned host buffers (:meth:`HostMasterWeights.stage`) and the next sync,
once the engine is idle, copies them in (:meth:`SharedTrainedWeights.flush`) before the engine loads the other
weights (norms, biases) as before. A forward between an optimizer step and that sync would read the previous
weights: a forward pre-hook on the input embeddings refuses it (:class:`StaleSharedWeightsError`). So the module
must take one optimizer step per rollout.

Only this direction is safe: the engine's decode steps replay CUDA graphs captured with its own weights'
addresses, so its parameters cannot move, while the trainer's can. :meth:`SharedTrainedWeights.unshare` gives the
trainer private copies (with any waiting values) before the engine goes. Checkpoints are unaffected: the state dict
holds the fp32 masters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_rl.lora import is_lora
from lightning_rl.models import unwrap
from lightning_rl.rollout.shared_weights import moved_parameter, weight_views

if TYPE_CHECKING:
    from lightning_rl.plugins.host_masters import HostMasterWeights

log = logging.getLogger(__name__)


class StaleSharedWeightsError(RuntimeError):
    """A forward of a policy whose weights are the engine's, after an optimizer step and before the next sync."""


def trained_weights_unsupported_reason(model: nn.Module, masters: HostMasterWeights | None) -> str | None:
    """Why ``model``'s trainable weights cannot be the engine's (None when they can, weight layouts aside)."""
    if is_lora(model):
        return "a LoRA policy shares its frozen base instead (EngineSettings(share_merged_base=...))"
    if masters is None or not len(masters):
        return ("the trainable weights keep their fp32 values on the device; only bf16 copies of fp32 masters in host "
                "memory can be the engine's (MemoryAwarePrecision(master_weights='cpu'))")
    if not shared_parameters(model, masters):
        return "the policy has no trainable weight whose fp32 master lives in host memory"
    return None


def shared_parameters(model: nn.Module, masters: HostMasterWeights) -> dict[str, nn.Parameter]:
    """``{transformers name: parameter}`` of the policy's weights whose masters ``masters`` keeps (a tied one once)."""
    return {name: p for name, p in unwrap(model).named_parameters() if masters.manages(p)}


@dataclass
class SharedTrainedWeights:
    """Trainable parameters that point into the engine's weights, and what undoes it.

    Attributes:
        views: ``{name: (parameter, view of the engine's weight)}``.
        masters: the host masters whose stepped values wait for :meth:`flush`.
        hooks: the freshness check on the input embeddings.
        skipped: ``{name: why}`` of trainable weights left private (the engine lacks them or holds another dtype).
    """

    views: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    masters: HostMasterWeights | None = None
    hooks: list[RemovableHandle] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_shared(self) -> int:
        """Device bytes the trainer no longer holds a copy of."""
        return sum(v.numel() * v.element_size() for _, v in self.views.values())

    @property
    def names(self) -> set[str]:
        """The shared weights' transformers names (the sync leaves them out)."""
        return set(self.views)

    def stale(self) -> bool:
        """Whether stepped values wait in host memory (an optimizer step since the last :meth:`flush`)."""
        staging = None if self.masters is None else self.masters.staging
        return bool(self.views) and staging is not None and bool(staging.waiting)

    def check_fresh(self) -> None:
        """Raise :class:`StaleSharedWeightsError` when :meth:`stale`, RuntimeError when a parameter was moved."""
        if not self.views or self.masters is None or self.masters.staging is None:
            return  # not shared, or the masters went back into the parameters (the end of a fit)
        moved = moved_parameter(self.views)
        if moved is not None:
            raise RuntimeError(
                f"{moved} no longer points at the engine's weights (something gave the parameter new storage), so "
                "the engine would not see its updates: keep the policy's weights where they are while "
                "they are shared with the engine, or set share_trained_weights=False")
        if self.stale():
            raise StaleSharedWeightsError(
                "the policy's weights are the rollout engine's own (EngineSettings(share_trained_weights)), and "
                "the optimizer's last step waits in host memory until the engine's next sync (the engine may be "
                "generating from the previous weights now): sync the engine (engine.sync_weights(policy)) before this "
                "forward, or run without sharing (share_trained_weights=False)")

    def flush(self) -> int:
        """Copy the stepped values into the engine's weights (the engine must be idle). Returns the bytes copied."""
        if not self.views or self.masters is None:
            return 0
        return self.masters.flush_staged()

    def unshare(self) -> None:
        """Give every shared parameter a private device copy holding its latest values, and remove the hook."""
        for p, view in self.views.values():
            if p.data_ptr() == view.data_ptr():
                p.data = view.clone()
        if self.masters is not None and self.masters.staging is not None:
            self.masters.unstage()  # the values that waited go into the private copies
        for handle in self.hooks:
            handle.remove()
        self.views, self.masters, self.hooks, self.skipped = {}, None, [], {}


def share_trained_weights(
    model: nn.Module, engine_model: nn.Module, masters: HostMasterWeights | None
) -> tuple[SharedTrainedWeights, str | None]:
    """Point ``model``'s host-mastered weights at ``engine_model``'s, which must hold the same values now.

    From then on the optimizer's results for them wait in host buffers; call :meth:`SharedTrainedWeights.flush`
    when the engine is idle (each sync). Weights the engine holds in another dtype stay private (synced by loading,
    as before). ``engine_model`` needs ``named_parameters()`` and, for packed layers, ``packed_modules_mapping``.

    Returns:
        The share and None; or an empty :class:`SharedTrainedWeights` and why sharing is impossible (nothing
        changed then).
    """
    reason = trained_weights_unsupported_reason(model, masters)
    if reason:
        return SharedTrainedWeights(), reason
    assert masters is not None
    if masters.staging is not None:
        return SharedTrainedWeights(), "the weights' stepped values are staged for another engine already"
    views, reason, skipped = weight_views(shared_parameters(model, masters), engine_model, skip_other_dtypes=True)
    if reason:
        return SharedTrainedWeights(), reason
    if not views:
        return SharedTrainedWeights(), f"the engine holds none of the trainable weights alike ({skipped})"
    masters.stage([p for p, _ in views.values()])
    share = SharedTrainedWeights(views=views, masters=masters, skipped=skipped)
    for p, view in views.values():
        p.data = view
    embeddings = unwrap(model).get_input_embeddings()
    share.hooks.append(embeddings.register_forward_pre_hook(lambda module, args: share.check_fresh()))
    torch.compiler.reset()  # compiled layers read the parameters' new storage from their next trace
    if skipped:
        log.info("shared trained weights: %d kept private (%s)", len(skipped), "; ".join(skipped.values()))
    return share, None


__all__ = ["SharedTrainedWeights", "StaleSharedWeightsError", "share_trained_weights", "shared_parameters",
           "trained_weights_unsupported_reason"]
