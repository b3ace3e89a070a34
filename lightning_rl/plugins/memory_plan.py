"""The memory plan: whether training and a colocated rollout engine fit on one device, and with what sizes.

Pure functions and dataclasses over byte counts, so the arithmetic is testable on any machine.
A step has two phases that never hold memory at the same time:

* **rollout**: policy weights, optimizer states unless they are offloaded to the CPU, the engine's
  weights, its KV cache and its workspace;
* **train**: policy weights, gradients, optimizer states, the activations of one micro-batch
  (proportional to its tokens) and fixed extras (a log-prob chunk, a reference model).

When the optimizer states live in CPU memory and are streamed through the device during the step
(``MemoryAwarePrecision(optimizer_states="cpu")``), the train phase counts one streamed chunk of
states instead of all of them, and the rollout phase none.

:func:`plan_memory` picks the largest micro-batch (in tokens) and the KV-cache budget that fit,
or raises :class:`MemoryPlanError` with the figure of each part and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_rl.rollout.sharded_weights import is_dtensor

GiB = 1024**3
MiB = 1024**2

#: Upper bound of a micro-batch chosen automatically (tokens): more than one rollout of a usual GRPO step
#: (128 sequences of a few hundred tokens), so a step trains in one micro-batch whenever memory allows. The
#: update of a small model is bound by the CPU launching kernels, which costs the same per micro-batch
#: whatever its size (``bench/results/vs_trl_NOTES.md`` has the measurements).
MAX_MICRO_BATCH_TOKENS = 65536
#: Upper bound (padded tokens) of a micro-batch chosen automatically when only adapters train (LoRA). The
#: trainer then holds little besides the update's activations, so halving a usual rollout's micro-batch halves
#: them, and the update is short beside the generation it overlaps. On an H200, SmolLM2 LoRA r=16 beside TRL in
#: one call: two micro-batches of 64 took the peak from 2.96 to 2.77 GiB (0.265x to 0.247x TRL's) and the update
#: from 0.24 to 0.41 s, the step from 0.405 to 0.495 s (2.63x -> 2.15x TRL's speed) beside a fast generation;
#: beside the slower generation of another call (about 0.64 s) the longer update would be hidden.
ADAPTER_MICRO_BATCH_TOKENS = 16384


class MemoryPlanError(RuntimeError):
    """Training and the rollout engine cannot fit in the device memory budget."""


def fmt_bytes(n: float) -> str:
    """Human-readable size (GiB above 1 GiB, else MiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


@dataclass(frozen=True)
class ModelMemory:
    """Parameter counts and bytes of a model, split into trainable and frozen."""

    trainable_params: int
    trainable_bytes: int
    frozen_params: int
    frozen_bytes: int

    @property
    def total_params(self) -> int:
        """All parameters."""
        return self.trainable_params + self.frozen_params

    @property
    def total_bytes(self) -> int:
        """Bytes of all parameters as stored."""
        return self.trainable_bytes + self.frozen_bytes

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module]) -> ModelMemory:
        """Count the parameters of ``modules`` (shared parameters once), as this process stores them.

        An FSDP2-sharded parameter (a ``DTensor``) counts its local shard: the plan is per process.
        """
        seen: set[int] = set()
        tp = tb = fp = fb = 0
        for module in modules:
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                numel = stored_numel(p)
                nbytes = numel * p.element_size()
                if p.requires_grad:
                    tp, tb = tp + numel, tb + nbytes
                else:
                    fp, fb = fp + numel, fb + nbytes
        return cls(tp, tb, fp, fb)


def stored_numel(p: torch.Tensor) -> int:
    """Elements this process stores of ``p``: the local shard of an FSDP2 ``DTensor``, else all of them."""
    return p.to_local().numel() if is_dtensor(p) else p.numel()


def fsdp2_gathered_parts(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """``(root bytes, largest layer bytes)`` of the ``fully_shard`` units in ``modules``, each at its full size.

    Root units are the ones no other unit holds (embedding, final norm, LM head); layer units are nested ones.
    ``(0, 0)`` when nothing in ``modules`` is sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
    nested = {id(u) for unit in units for u in unit.modules() if u is not unit and isinstance(u, FSDPModule)}
    roots, layers = 0, [0]
    for unit in {id(u): u for u in units}.values():
        inner = {id(p) for u in unit.modules() if u is not unit and isinstance(u, FSDPModule) for p in u.parameters()}
        full = sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) not in inner)
        if id(unit) in nested:
            layers.append(full)
        else:
            roots += full
    return roots, max(layers)


def fsdp2_gathered_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes FSDP2 holds gathered at once beyond the shards: the root unit's parameters and two layers'.

    The root unit (embedding, final norm, LM head) stays gathered from the forward to the backward; a layer
    unit is gathered for its own forward and backward while the next one is prefetched. 0 when nothing in
    ``modules`` is sharded with ``fully_shard``.
    """
    roots, layer = fsdp2_gathered_parts(modules)
    return roots + 2 * layer


def fsdp2_gathered_bytes_with_reference(policy: Iterable[nn.Module], reference: Iterable[nn.Module]) -> int:
    """The most FSDP2 holds gathered at once for a sharded policy and a sharded frozen reference beside it.

    The policy's root stays gathered after its forward (until its backward, or its next forward after a no-grad
    one), and a reference forward can run in that window: DPO's pair loss runs it after the policy's forward with
    gradients, PPO's and GRPO's preparation after a no-grad policy forward. The reference gives its own root back
    after each forward, so at most one of the two sets of layers is gathered: the policy's root, then the larger
    of its two layers and the reference's root with two of its layers.
    """
    policy_root, policy_layer = fsdp2_gathered_parts(policy)
    ref_root, ref_layer = fsdp2_gathered_parts(reference)
    return policy_root + max(2 * policy_layer, ref_root + 2 * ref_layer)


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config: Any, dtype_bytes: int = 2, tensor_parallel_size: int = 1) -> int:
    """KV-cache bytes per token: ``2 (K and V) * layers * kv_heads * head_dim * dtype bytes``.

    With ``tensor_parallel_size = T`` the bytes one shard holds: ``kv_heads // T`` heads (at least one: vLLM
    replicates the KV heads when there are fewer than ``T``).
    """
    text = _text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    kv_heads = max(1, kv_heads // tensor_parallel_size)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


RECOMPUTED_LAYER_COPIES = 4
"""Copies of one layer's activations alive in a checkpointed backward (:func:`activation_bytes_per_token`)."""

OFFLOADED_INPUTS_ON_DEVICE = 2
"""Layers whose checkpointed inputs are on the device at once when they are offloaded to the host."""


def activation_bytes_per_token(config: Any, dtype_bytes: int = 2, gradient_checkpointing: bool = False,
                               offload_checkpoints: bool = False, tile_mlps: bool = False) -> int:
    """Estimated activation bytes kept for the backward, per token of a micro-batch.

    A decoder layer keeps about ``10 * hidden + 2 * kv_dim + 5 * intermediate`` values per token
    (norm inputs and outputs, q/k/v, attention output, MLP gate/up/product, residuals). With
    gradient checkpointing each layer's input (fp32 residual stream) stays alive, and the layer being
    recomputed holds :data:`RECOMPUTED_LAYER_COPIES` times one layer's values: its recomputed
    activations, their gradients, and the fp32 temporaries of norms and casts. That factor is measured:
    a SmolLM2 full fine-tune with compiled layers on an H200 peaked at about 178 KB a token of micro-batch
    (two budgets, 2,560 and 5,760 tokens), where a single layer copy gave 95 KB and four give 180 KB.
    With ``offload_checkpoints`` the layers' inputs wait in host memory, and only
    :data:`OFFLOADED_INPUTS_ON_DEVICE` of them are on the device at once (the one being copied and the one in use).
    With ``tile_mlps`` the recomputed layer's MLP holds its intermediates for one slice of the tokens at a time
    (:mod:`lightning_rl.tiled_mlp`): about one ``hidden``-sized tensor per token instead of ``intermediate``.
    Memory-efficient attention is assumed (no ``seq x seq`` score matrix).
    """
    text = _text_config(config)
    h = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    per_layer = (10 * h + 2 * kv_heads * head_dim + 5 * inter) * dtype_bytes
    layers = text.num_hidden_layers
    if gradient_checkpointing:
        inputs_on_device = min(layers, OFFLOADED_INPUTS_ON_DEVICE) if offload_checkpoints else layers
        recomputed = per_layer - 5 * (inter - min(inter, h)) * dtype_bytes if tile_mlps else per_layer
        return inputs_on_device * h * 4 + RECOMPUTED_LAYER_COPIES * recomputed
    return layers * per_layer


#: Tokens of one KV block (vLLM's default): each sequence may waste up to one partly filled block
KV_BLOCK_TOKENS = 16


def rollout_kv_tokens(num_prompts: int, num_generations: int, prompt_length: int, max_new_tokens: int,
                      shared_prompts: bool = True, block_size: int = KV_BLOCK_TOKENS) -> int:
    """KV-cache tokens of one rollout of ``num_prompts * num_generations`` sequences (without headroom).

    With prefix caching the ``G`` completions of a prompt share its prompt blocks, so the prompt counts
    once per prompt; every sequence may waste one partly filled block.
    """
    sequences = num_prompts * num_generations
    prompt_tokens = (num_prompts if shared_prompts else sequences) * prompt_length
    return max(prompt_tokens + sequences * (max_new_tokens + block_size), prompt_length + max_new_tokens + block_size)


def micro_batch_tokens_for(free_bytes: int, activation_bytes_per_token: int, fraction: float = 0.8,
                           limit: int = MAX_MICRO_BATCH_TOKENS) -> int:
    """Tokens of a micro-batch whose activations take at most ``fraction`` of ``free_bytes`` (at most ``limit``).

    Returns at least 1: a micro-batch always holds one sequence, whatever memory says.
    """
    if activation_bytes_per_token <= 0:
        return limit
    return int(max(1, min(limit, fraction * max(free_bytes, 0) // activation_bytes_per_token)))


def optimizer_state_bytes(trainable_params: int, states_per_param: int = 2, state_bytes: int = 4) -> int:
    """Estimated optimizer state: AdamW keeps two fp32 moments per trainable parameter."""
    return trainable_params * states_per_param * state_bytes


def optimizer_state_bytes_of(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds now (0 before its first step)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@dataclass(frozen=True)
class RolloutNeeds:
    """What the rollout engine needs while it is awake.

    Args:
        kv_bytes_per_token: KV-cache bytes per token (see :func:`kv_bytes_per_token`).
        tokens: tokens of one rollout (sequences x (prompt + completion)); 0 if unknown.
        engine_weight_bytes: the engine's own copy of the weights (0 when it generates with the policy).
        overhead_bytes: the engine's workspace (sampler, activations, CUDA graphs).
        headroom: multiplier on the exact KV need.
        offload_optimizer: optimizer states go to the CPU while the engine is awake.
        min_tokens: KV-cache tokens of one whole sequence: the least an engine that generates the rollout in
            waves needs (0: it cannot, the whole rollout's KV cache must fit).
    """

    kv_bytes_per_token: int
    tokens: int = 0
    engine_weight_bytes: int = 0
    overhead_bytes: int = 0
    headroom: float = 1.2
    offload_optimizer: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen sizes and the figures behind them (bytes)."""

    budget_bytes: int
    micro_batch_tokens: int
    kv_cache_bytes: int | None
    train_parts: dict[str, int] = field(default_factory=dict)
    rollout_parts: dict[str, int] = field(default_factory=dict)
    activation_bytes_per_token: int = 0
    #: the share of one rollout's KV-cache tokens the KV budget holds: below 1 the engine generates in waves
    kv_fraction: float = 1.0

    @property
    def train_peak_bytes(self) -> int:
        """Planned peak of the train phase."""
        return sum(self.train_parts.values())

    @property
    def rollout_peak_bytes(self) -> int:
        """Planned peak of the rollout phase."""
        return sum(self.rollout_parts.values())

    def micro_batch_sequences(self, sequence_tokens: int) -> int:
        """Whole sequences of ``sequence_tokens`` tokens in one planned micro-batch (>= 1)."""
        return max(1, self.micro_batch_tokens // max(1, sequence_tokens))

    def summary(self) -> str:
        """A few lines with every part's figure."""
        lines = [f"memory plan (budget {fmt_bytes(self.budget_bytes)}):"]
        lines.append(f"  train phase {fmt_bytes(self.train_peak_bytes)}, micro-batch {self.micro_batch_tokens} tokens")
        lines += [f"    {k}: {fmt_bytes(v)}" for k, v in self.train_parts.items()]
        if self.rollout_parts:
            kv = "unset" if self.kv_cache_bytes is None else fmt_bytes(self.kv_cache_bytes)
            if self.kv_fraction < 1:
                kv += f" ({self.kv_fraction:.0%} of one rollout's tokens: generated in waves)"
            lines.append(f"  rollout phase {fmt_bytes(self.rollout_peak_bytes)}, KV cache {kv}")
            lines += [f"    {k}: {fmt_bytes(v)}" for k, v in self.rollout_parts.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for checkpoints and logs."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(data))


@dataclass(frozen=True)
class RunSettings:
    """What the run already does, so that :class:`MemoryPlanError` suggests only changes that would help.

    None means not known: the change is still suggested.

    Args:
        adapters: only adapters train (LoRA); None infers it from the model (at most a tenth of the parameters
            train).
        gradient_checkpointing: activations are recomputed in the backward.
        offload_checkpoints: the checkpointed layers' inputs wait in host memory.
        cuda: the device is a CUDA device (quantized weights and offloaded checkpoints need one).
        quantized: the frozen weights are stored in 8 or 4 bits already.
    """

    adapters: bool | None = None
    gradient_checkpointing: bool | None = None
    offload_checkpoints: bool | None = None
    cuda: bool | None = None
    quantized: bool | None = None

    def trains_adapters(self, model: ModelMemory) -> bool:
        """Whether only adapters train: the setting, else at most a tenth of ``model``'s parameters train."""
        if self.adapters is not None:
            return self.adapters
        return model.total_params > 0 and 10 * model.trainable_params <= model.total_params


_STREAM_FIX = ("keep optimizer states in CPU memory and stream them through the step chunk by chunk: "
               "MemoryAwarePrecision(optimizer_states='cpu')")
_LORA_FIX = "train LoRA adapters instead of all weights (lora={'r': 16}): no gradients or optimizer state for the base"
_CHECKPOINTING_FIX = "turn on gradient_checkpointing=True (activations per token shrink about tenfold)"
_OFFLOAD_CHECKPOINTS_FIX = ("with gradient checkpointing on CUDA, keep the checkpointed layers' inputs in host memory: "
                            "offload_checkpoints=True")
_QUANTIZE_FIX = "store frozen weights in 8/4 bits: MemoryAwarePrecision(quantize='int8' or 'nf4') (needs bitsandbytes)"
_SHORTER_FIX = "use shorter sequences (max_prompt_length, max_new_tokens)"
_OFFLOAD_OPTIMIZER_FIX = ("offload optimizer states while the engine is awake: "
                          "MemoryAwarePrecision(offload_optimizer=True)")
_FEWER_TOKENS_FIX = ("generate fewer tokens per step (fewer prompts per batch, smaller num_generations or "
                     "max_new_tokens)")
_LORA_ROLLOUT_FIX = "train LoRA adapters (lora={'r': 16}): a smaller optimizer state"


def _size(n: int) -> str:
    """``n`` bytes as :func:`fmt_bytes` writes it, in bytes below 1 MiB (a budget of 24 bytes is no "0.0 MiB")."""
    return fmt_bytes(n) if abs(n) >= MiB else f"{int(n)} bytes"


def _budget_fix(budget: int, reserved: int, need: int) -> str:
    """Raise ``memory_budget`` (its units spelled out) or lower ``reserved_bytes``."""
    fix = (f"raise memory_budget (now {int(budget)} bytes; a value > 1 is bytes, <= 1 a fraction of the device; "
           f"this phase needs at least {_size(need)})")
    if reserved > 0:
        fix += f" or lower reserved_bytes (now {_size(reserved)})"
    return fix + ", or use a device with more memory"


def _order_fixes(budget: int, reserved: int, need: int, fixed: int, candidates: Iterable[tuple[int, str]],
                 shrink_fixed: Iterable[tuple[int, str]], fixed_names: str) -> list[str]:
    """The changes to suggest, the one that frees the most first.

    ``candidates`` and ``shrink_fixed`` are ``(bytes it would free, change)``; those that free nothing are left
    out. When the fixed parts (``fixed`` bytes of ``fixed_names``: reserve, context, weights) alone exceed the
    budget, nothing else can help: the budget comes first and only the changes in ``shrink_fixed`` follow.
    Otherwise the budget comes last.
    """
    def ranked(fixes: Iterable[tuple[int, str]]) -> list[str]:
        return [text for _, text in sorted((f for f in fixes if f[0] > 0), key=lambda f: -f[0])]

    if fixed >= budget:
        first = (f"{fixed_names} alone take {_size(fixed)}, more than the budget: "
                 + _budget_fix(budget, reserved, need))
        return [first, *ranked(shrink_fixed)]
    return [*ranked([*candidates, *shrink_fixed]), _budget_fix(budget, reserved, need)]


def _train_fixes(parts: Mapping[str, int], budget: int, reserved: int, fixed: int, model: ModelMemory,
                 grads: int, opt: int, streamed: bool, one_sequence: int, settings: RunSettings) -> list[str]:
    """What to change when one sequence's activations do not fit, given what the run already does."""
    opt_on_device = sum(v for k, v in parts.items() if k.startswith("optimizer states"))
    checkpointing = settings.gradient_checkpointing
    candidates = [
        (0 if settings.trains_adapters(model) else grads + opt_on_device, _LORA_FIX),
        (0 if streamed or settings.cuda is False else opt, _STREAM_FIX),
        (0 if checkpointing else one_sequence * 9 // 10, _CHECKPOINTING_FIX),
        (0 if checkpointing is False or settings.offload_checkpoints or settings.cuda is False else one_sequence // 2,
         _OFFLOAD_CHECKPOINTS_FIX),
        (one_sequence // 2, _SHORTER_FIX),
    ]
    return _order_fixes(budget, reserved, sum(parts.values()), fixed, candidates, [_quantize_fix(model, settings)],
                        _fixed_names(parts))


def _quantize_fix(model: ModelMemory, settings: RunSettings) -> tuple[int, str]:
    """``(bytes it would free, change)`` of quantizing the frozen weights (nothing when done already or off CUDA)."""
    can_quantize = not settings.quantized and settings.cuda is not False
    return (model.frozen_bytes // 2 if can_quantize else 0, _QUANTIZE_FIX)


def _fixed_names(parts: Mapping[str, int]) -> str:
    """The fixed parts of a phase in words: "the reserve, the CUDA context and the weights"."""
    names = ["the reserve", *(["the CUDA context"] if parts.get(CONTEXT_PART) else []), "the weights"]
    if parts.get("engine weights") or parts.get("engine workspace"):
        names.append("the engine's weights and workspace")
    return ", ".join(names[:-1]) + " and " + names[-1]


def _rollout_fixes(parts: Mapping[str, int], budget: int, reserved: int, fixed: int, model: ModelMemory, kv: int,
                   opt_on_device: int, settings: RunSettings) -> list[str]:
    """What to change when the rollout's KV cache does not fit, given what the run already does."""
    candidates = [
        (0 if settings.cuda is False else opt_on_device, _OFFLOAD_OPTIMIZER_FIX),
        (kv // 2, _FEWER_TOKENS_FIX),
        (0 if settings.trains_adapters(model) else opt_on_device, _LORA_ROLLOUT_FIX),
    ]
    return _order_fixes(budget, reserved, sum(parts.values()), fixed, candidates, [_quantize_fix(model, settings)],
                        _fixed_names(parts))


ENGINE_BESIDE_PART = "engine running beside the update (own process)"
_ENGINE_ROLLOUT_PARTS = ("engine weights", "engine workspace", "KV cache")


def planned_engine_bytes(plan: MemoryPlan) -> int | None:
    """What ``plan`` counts for the rollout engine once it has started (None: the plan has no engine).

    An engine beside the update (its own process) is one train-phase part; an engine between updates is its
    weights, workspace and KV cache in the rollout phase.
    """
    if plan.train_parts.get(ENGINE_BESIDE_PART):
        return plan.train_parts[ENGINE_BESIDE_PART]
    if not any(k in plan.rollout_parts for k in _ENGINE_ROLLOUT_PARTS):
        return None
    return sum(plan.rollout_parts.get(k, 0) for k in _ENGINE_ROLLOUT_PARTS)


CONTEXT_PART = "CUDA context and libraries (outside PyTorch)"


def _context_part(context_bytes: int) -> dict[str, int]:
    return {CONTEXT_PART: int(context_bytes)} if context_bytes > 0 else {}


def _explain(phase: str, parts: Mapping[str, int], budget: int, need: str, fixes: Iterable[str]) -> str:
    lines = [f"the {phase} phase does not fit in the memory budget of {_size(budget)}: {need}."]
    lines += [f"  {k}: {fmt_bytes(v)}" for k, v in parts.items()]
    lines.append(f"  total: {fmt_bytes(sum(parts.values()))}")
    lines.append("What to change:")
    lines += [f"  - {f}" for f in fixes]
    return "\n".join(lines)


def plan_memory(
    *,
    budget_bytes: int,
    model: ModelMemory,
    activation_bytes_per_token: int,
    sequence_tokens: int,
    optimizer_bytes: int | None = None,
    grad_bytes: int | None = None,
    rollout: RolloutNeeds | None = None,
    max_micro_batch_tokens: int | None = None,
    extra_train_parts: Mapping[str, int] | None = None,
    reserved_bytes: int = 256 * MiB,
    optimizer_device_bytes: int | None = None,
    context_bytes: int = 0,
    waves: bool = False,
    settings: RunSettings | None = None,
) -> MemoryPlan:
    """Choose the micro-batch size (tokens) and the KV-cache budget, or explain why nothing fits.

    Args:
        budget_bytes: device memory training may use.
        model: the policy's parameters as stored (after precision conversion).
        activation_bytes_per_token: see :func:`activation_bytes_per_token`.
        sequence_tokens: tokens of one padded sequence; a micro-batch holds at least one.
        optimizer_bytes: optimizer state; None estimates AdamW (two fp32 moments per trainable parameter).
        grad_bytes: gradients; None: one per trainable parameter in its stored dtype.
        rollout: the rollout engine's needs; None when there is no rollout phase to plan.
        max_micro_batch_tokens: upper bound (e.g. the whole batch); None: no bound.
        extra_train_parts: other fixed train-phase bytes by name (a log-prob chunk, a reference model).
        reserved_bytes: kept free for the allocator's fragmentation and small buffers.
        optimizer_device_bytes: set when the optimizer states live in CPU memory and are streamed through
            the device during the step: the bytes of states on the device at once (one chunk). The train
            phase counts this instead of ``optimizer_bytes`` and the rollout phase counts no states.
            None: all states stay on the device.
        context_bytes: the process's device memory outside PyTorch's allocator (CUDA context, libraries'
            modules), counted in both phases so that the budget is the process's whole figure (what NVML and
            ``nvidia-smi`` show).
        waves: when a whole rollout's KV cache does not fit, give the engine what is left, if that holds
            ``rollout.min_tokens`` (one whole sequence): it then generates the rollout a part at a time.
        settings: what the run already does (LoRA, gradient checkpointing, the device), so that the error's
            "What to change" leaves out what is done already; None: nothing is known, every change is listed.

    Raises:
        MemoryPlanError: a phase cannot fit, with each part's figure and what to change.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    if sequence_tokens < 1 or activation_bytes_per_token < 0:
        raise ValueError("sequence_tokens must be >= 1 and activation_bytes_per_token >= 0")
    opt = optimizer_state_bytes(model.trainable_params) if optimizer_bytes is None else optimizer_bytes
    grads = model.trainable_bytes if grad_bytes is None else grad_bytes
    streamed = optimizer_device_bytes is not None
    if streamed:
        opt_part = {"optimizer states (streamed from CPU, one chunk)": min(opt, int(optimizer_device_bytes))}
    else:
        opt_part = {"optimizer states": opt}
    static = {
        "frozen weights": model.frozen_bytes,
        "trainable weights": model.trainable_bytes,
        "gradients": grads,
        **opt_part,
        **dict(extra_train_parts or {}),
        "reserve": reserved_bytes,
        **_context_part(context_bytes),
    }
    settings = settings or RunSettings()
    weights = model.frozen_bytes + model.trainable_bytes + reserved_bytes + max(context_bytes, 0)
    free = budget_bytes - sum(static.values())
    min_act = activation_bytes_per_token * sequence_tokens
    if free < min_act:
        parts = {**static, f"activations of one sequence ({sequence_tokens} tokens)": min_act}
        fixes = _train_fixes(parts, budget_bytes, reserved_bytes, weights, model, grads, opt, streamed, min_act,
                             settings)
        raise MemoryPlanError(_explain("train", parts, budget_bytes, f"one sequence needs {fmt_bytes(min_act)} of "
                                       f"activations and {fmt_bytes(max(free, 0))} is left", fixes))
    tokens = free // activation_bytes_per_token if activation_bytes_per_token else 2**31
    if max_micro_batch_tokens is not None:
        tokens = min(tokens, max(max_micro_batch_tokens, sequence_tokens))
    tokens = max(sequence_tokens, (tokens // sequence_tokens) * sequence_tokens)
    train_parts = {**static, f"activations ({tokens} tokens)": tokens * activation_bytes_per_token}

    kv_budget, kv_fraction = None, 1.0
    rollout_parts: dict[str, int] = {}
    if rollout is not None:
        rstatic = {
            "frozen weights": model.frozen_bytes,
            "trainable weights": model.trainable_bytes,
            "optimizer states": 0 if rollout.offload_optimizer or streamed else opt,
            "engine weights": rollout.engine_weight_bytes,
            "engine workspace": rollout.overhead_bytes,
            "reserve": reserved_bytes,
            **_context_part(context_bytes),
        }
        kv_free = budget_bytes - sum(rstatic.values())
        exact = rollout.tokens * rollout.kv_bytes_per_token
        least = rollout.min_tokens * rollout.kv_bytes_per_token
        in_waves = waves and 0 < least <= kv_free < exact
        if kv_free < max(exact, rollout.kv_bytes_per_token) and not in_waves:
            parts = {**rstatic, f"KV cache ({rollout.tokens} tokens)": exact}
            fixed = weights + rollout.engine_weight_bytes + rollout.overhead_bytes
            fixes = _rollout_fixes(parts, budget_bytes, reserved_bytes, fixed, model, exact,
                                   rstatic["optimizer states"], settings)
            need = f"the KV cache needs {fmt_bytes(exact)} and {fmt_bytes(max(kv_free, 0))} is left"
            if waves and least:
                need += f" (generating in waves needs {fmt_bytes(least)}, one whole sequence)"
            raise MemoryPlanError(_explain("rollout", parts, budget_bytes, need, fixes))
        wanted = math.ceil(exact * rollout.headroom) if rollout.tokens else kv_free
        kv_budget = int(min(kv_free, wanted))
        kv_fraction = kv_budget / exact if in_waves else 1.0
        rollout_parts = {**rstatic, "KV cache": kv_budget}
    return MemoryPlan(budget_bytes=int(budget_bytes), micro_batch_tokens=int(tokens), kv_cache_bytes=kv_budget,
                      train_parts=train_parts, rollout_parts=rollout_parts,
                      activation_bytes_per_token=int(activation_bytes_per_token), kv_fraction=kv_fraction)


__all__ = [
    "CONTEXT_PART",
    "ENGINE_BESIDE_PART",
    "ADAPTER_MICRO_BATCH_TOKENS",
    "MAX_MICRO_BATCH_TOKENS",
    "GiB",
    "KV_BLOCK_TOKENS",
    "MiB",
    "MemoryPlan",
    "MemoryPlanError",
    "ModelMemory",
    "RECOMPUTED_LAYER_COPIES",
    "RolloutNeeds",
    "RunSettings",
    "activation_bytes_per_token",
    "fmt_bytes",
    "kv_bytes_per_token",
    "micro_batch_tokens_for",
    "optimizer_state_bytes",
    "optimizer_state_bytes_of",
    "plan_memory",
    "planned_engine_bytes",
    "rollout_kv_tokens",
]
