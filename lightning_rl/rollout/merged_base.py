"""A LoRA policy whose frozen base is the engine process's merged weights: one copy of the base on the GPU.

An engine in its own process (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`) generates with merged
weights ``W + s * B0 @ A0``, where ``(A0, B0)`` are the adapters of the last sync. Sharing points the trainer's
frozen base parameters at views of those merged weights (CUDA IPC) and frees the trainer's own copy. Each adapted
layer then runs its base layer only (peft's adapters disabled in that layer) and passes its output through
:class:`~lightning_rl.lora_gradients.AdapterGradients`, which adds nothing to the value and gives ``A`` and ``B``
their gradients in the backward; the input's gradient comes through the merged weight
(``W_m^T = W^T + s A0^T B0^T``). The forward is therefore ``(W + s * B0 A0) x``: the policy exactly (up to the
merge's rounding to the engine's dtype, the same rounding the engine generates with) as long as the adapters are the
synced ones, and so are all its gradients; no adapter output is computed.

Each sync after sharing merges in the trainer's process (:meth:`MergedBase.merge`): the trainer's base parameters
are views of the engine's weights, so it writes ``W + s * B @ A`` (from the pristine base, pinned in host memory)
into them directly, with no call into the engine process and no pass through vLLM's weight loaders.

After an optimizer step the adapters differ from the merged ones until the next sync; a forward then would
compute the previous policy. A forward pre-hook on the input embeddings compares the adapters' version counters
with those recorded at the sync and refuses such a forward. The pristine base stays in host memory: the state
dict (checkpoints and their fingerprints) holds it instead of the merged values, and :meth:`MergedBase.unshare`
gives the trainer private device copies of it again before the engine goes away.

TorchDynamo does not guard on module hooks, so compiled decoder layers keep whatever hooks they were traced with:
sharing and unsharing both reset torch.compile's caches (the layers compile again at their next update), and one
process holds one such policy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_rl.lora import is_lora
from lightning_rl.lora_gradients import AdapterGradients
from lightning_rl.models import unwrap
from lightning_rl.rollout.engine_weights import lora_products, merged_weight
from lightning_rl.rollout.policy_weights import strip_peft
from lightning_rl.rollout.shared_weights import base_weight_views, moved_parameter


class StaleMergedBaseError(RuntimeError):
    """A forward of a policy whose shared base holds adapters older than the policy's own."""


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """``(name, layer, active adapters with a lora_A)`` of every unmerged LoRA layer that has one."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and not layer.merged:
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if active:
                out.append((name, layer, active))
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The active LoRA ``A`` and ``B`` weights of every adapted layer, in module order."""
    return [w for _, layer, active in _adapted_layers(model) for a in active
            for w in (layer.lora_A[a].weight, layer.lora_B[a].weight)]


def merged_base_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s LoRA base cannot be the engine's merged weights (None when it can, weights aside).

    It needs a LoRA policy whose adapted layers take their gradients from :class:`AdapterGradients`: no LoRA
    dropout (the adapter's input would differ from the layer's) and no peft variant such as DoRA.
    """
    if not is_lora(model):
        return "the policy has no LoRA adapter"
    adapted = _adapted_layers(unwrap(model))
    if not adapted:
        return "the policy has no active LoRA adapter"
    for name, layer, active in adapted:
        for a in active:
            if not isinstance(layer.lora_dropout[a], nn.Identity):
                return f"{name} has LoRA dropout (lora_dropout > 0): the adapter's input differs from the layer's"
            if a in getattr(layer, "lora_variant", {}):
                return f"{name} uses a LoRA variant ({type(layer.lora_variant[a]).__name__})"
    return None


def adapter_gradients(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer whose base weight is merged: the adapters' gradients, no adapter output."""
    if not args:
        raise TypeError(f"{type(module).__name__} was called without a positional input; the merged base needs it")
    for a in module.active_adapters:
        if a in module.lora_A:
            output = AdapterGradients.apply(output, args[0], module.lora_A[a].weight, module.lora_B[a].weight,
                                            float(module.scaling[a]))
    return output


@dataclass
class MergedBase:
    """Frozen base parameters that point into the engine's merged weights, and what undoes it.

    Attributes:
        views: ``{name: (parameter, view of the engine's weight)}``.
        pristine: ``{name: host copy of the base}`` (the adapted weights' pinned where CUDA is available).
        adapted: ``{name: peft LoRA layer}`` for the views whose weight the adapters change.
        adapters: the adapter weights whose versions a sync records.
        hooks: the hooks installed (adapter gradients, the freshness check, the state dict's).
        disabled: each adapted layer with its peft ``_disable_adapters`` flag before sharing.
    """

    views: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    adapted: dict[str, nn.Module] = field(default_factory=dict)
    adapters: list[nn.Parameter] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    disabled: list[tuple[nn.Module, bool]] = field(default_factory=list)  # adapted layers, their flag before
    synced_versions: tuple[tuple[int, int], ...] | None = None

    @property
    def bytes_shared(self) -> int:
        """Device bytes the trainer no longer holds a copy of."""
        return sum(v.numel() * v.element_size() for _, v in self.views.values())

    @torch.no_grad()
    def merge(self) -> int:
        """Write ``base + sum(scale * B @ A)``, with the adapters as they are now, into each adapted weight.

        The writes are queued on the current stream: synchronize before the engine reads them. Call only while the
        engine does not generate. Returns how many weights were merged.
        """
        for name, layer in self.adapted.items():
            _, view = self.views[name]
            base = self.pristine[name].to(view.device, non_blocking=True)
            view.copy_(merged_weight(base, lora_products(layer)))
        return len(self.adapted)

    def mark_synced(self) -> None:
        """Record that the engine has just merged the adapters as they are now."""
        self.synced_versions = self._versions()

    def _versions(self) -> tuple[tuple[int, int], ...]:
        # in-place optimizer steps bump _version; a step that swaps .data moves the storage
        return tuple((p._version, p.data_ptr()) for p in self.adapters)

    def stale(self) -> bool:
        """Whether the adapters changed (an optimizer step) since the engine last merged them."""
        return self.synced_versions != self._versions()

    def check_fresh(self) -> None:
        """Raise :class:`StaleMergedBaseError` when :meth:`stale`, RuntimeError when a base parameter was moved."""
        if not self.views:
            return
        moved = moved_parameter(self.views)
        if moved is not None:
            raise RuntimeError(
                f"{moved} no longer points at the engine's merged weights (something gave the parameter new "
                "storage), and the adapted layers run their base layer only, so the adapter would be missing: keep "
                "the policy's frozen base where it is while share_merged_base=True, or turn it off")
        if self.stale():
            raise StaleMergedBaseError(
                "the policy's LoRA base is the engine's merged weights (VLLMRollout shares them by default beside "
                "an engine process), which hold the adapters of the last sync, and the adapters changed since (an "
                "optimizer step): sync the engine (engine.sync_weights(policy)) before this forward, or run without "
                "sharing (VLLMRollout(settings=EngineSettings(share_merged_base=False)))")

    def unshare(self) -> None:
        """Give every shared parameter a private device copy of the pristine base and remove the hooks."""
        for name, (p, view) in self.views.items():
            p.data = self.pristine[name].to(view.device)
        for handle in self.hooks:
            handle.remove()
        for layer, flag in self.disabled:
            layer._disable_adapters = flag
        if self.hooks:
            torch.compiler.reset()  # layers compiled with the hooks would keep running them
        self.views, self.pristine, self.adapted, self.adapters, self.hooks, self.disabled = {}, {}, {}, [], [], []
        self.synced_versions = None


def _owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[nn.Module, list[tuple[str, str]]]:
    """``{module: [(leaf, name), ...]}`` for every module that holds one of ``params`` (tied ones under each)."""
    by_id = {id(p): name for name, p in params.items()}
    owners: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)
    for module in model.modules():
        for leaf, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                owners[module].append((leaf, by_id[id(p)]))
    return owners


def _install_hooks(model: nn.Module, share: MergedBase) -> None:
    for _, layer, _ in _adapted_layers(model):
        share.disabled.append((layer, layer._disable_adapters))
        layer._disable_adapters = True  # peft runs the base layer only (not enable_adapters: it would freeze them)
        share.hooks.append(layer.register_forward_hook(adapter_gradients))
    embeddings = model.get_input_embeddings()
    share.hooks.append(embeddings.register_forward_pre_hook(lambda module, args: share.check_fresh()))
    for module, leaves in _owners(model, {n: p for n, (p, _) in share.views.items()}).items():

        def pristine_state(module: nn.Module, state: dict[str, Any], prefix: str, local: Any,
                           leaves: list[tuple[str, str]] = leaves) -> None:
            for leaf, name in leaves:
                if prefix + leaf in state and not isinstance(state[prefix + leaf], nn.Parameter):  # keep_vars=False
                    state[prefix + leaf] = share.pristine[name]

        def refuse_load(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any,
                        leaves: list[tuple[str, str]] = leaves) -> None:
            if any(prefix + leaf in state for leaf, _ in leaves):
                raise RuntimeError(
                    "load_state_dict into LoRA base weights shared with the engine's merged weights: load the "
                    "checkpoint before the engine starts (Trainer.fit(ckpt_path=...) does), or after it shut down")

        share.hooks.append(module.register_state_dict_post_hook(pristine_state))
        share.hooks.append(module.register_load_state_dict_pre_hook(refuse_load))


def share_merged_base(model: nn.Module, engine_model: nn.Module) -> tuple[MergedBase, str | None]:
    """Point ``model``'s frozen base parameters at ``engine_model``'s weights, which must hold the pristine base now.

    The engine merges the adapters into those weights at each later sync; call :meth:`MergedBase.mark_synced`
    after each (a forward before the first is refused). ``engine_model`` needs ``named_parameters()`` and, for
    packed layers, ``packed_modules_mapping``.

    Returns:
        The share and None; or an empty :class:`MergedBase` and why sharing is impossible (nothing changed then).
    """
    reason = merged_base_unsupported_reason(model)
    if reason:
        return MergedBase(), reason
    views, reason = base_weight_views(model, engine_model)
    if reason:
        return MergedBase(), reason
    inner = unwrap(model)
    adapted = {strip_peft(f"{name}.base_layer.weight"): layer for name, layer, _ in _adapted_layers(inner)}
    missing = sorted(set(adapted) - set(views))
    if missing:
        return MergedBase(), f"the adapted weight {missing[0]} has no view in the engine's weights"
    share = MergedBase(views=views, adapted=adapted, adapters=adapter_parameters(inner))
    cuda = torch.cuda.is_available()
    for name, (p, view) in views.items():  # pinned where each sync copies it to the device (the adapted weights)
        pin = cuda and name in adapted
        share.pristine[name] = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p.detach())
        p.data = view
    _install_hooks(inner, share)  # stale until the first merge: mark_synced after it
    torch.compiler.reset()  # compiled layers traced without the hooks would skip them (dynamo guards no hooks)
    return share, None


__all__ = ["MergedBase", "StaleMergedBaseError", "adapter_gradients", "adapter_parameters",
           "merged_base_unsupported_reason", "share_merged_base"]
