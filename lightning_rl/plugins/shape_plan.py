"""The memory plan of one module's steps: its :class:`~lightning_rl.shapes.TrainingShape` and the rollout engine's
:class:`~lightning_rl.plugins.rollout_memory.RolloutMemory`, turned into :func:`~.memory_plan.plan_memory`'s figures.

Plain data in, a :class:`~.memory_plan.MemoryPlan` out: no Lightning, no device.
"""

from __future__ import annotations

import torch

from lightning_rl.plugins.memory_plan import (
    ENGINE_BESIDE_PART,
    MAX_MICRO_BATCH_TOKENS,
    MemoryPlan,
    ModelMemory,
    RolloutNeeds,
    RunSettings,
    activation_bytes_per_token,
    kv_bytes_per_token,
    plan_memory,
)
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.shapes import TrainingShape


def _vocab_size(config: object) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def in_step_generation_needs(
    shape: TrainingShape, prompts_per_step: int | None, compute_dtype: torch.dtype
) -> RolloutNeeds:
    """The module generating inside its step (transformers ``generate``).

    A KV cache in the compute dtype, and the fp32 logits ``generate`` keeps for every new token (the
    sampled tokens' log-probs are read from them) plus one step's worth being read; no engine weights,
    no offloading.
    """
    sequences = prompts_per_step * shape.num_generations if prompts_per_step else 0
    logit_rows = max(sequences, 1) * (shape.max_new_tokens + 2)
    return RolloutNeeds(kv_bytes_per_token(shape.model_config, compute_dtype.itemsize),
                        sequences * shape.sequence_tokens, 0, logit_rows * _vocab_size(shape.model_config) * 4,
                        headroom=1.0, offload_optimizer=False)


def engine_needs(rollout: RolloutMemory, overhead_bytes: int, offload_optimizer: bool) -> RolloutNeeds | None:
    """A colocated engine's needs (None when it sizes itself by a fraction of the device)."""
    if rollout.sized_by_gpu_fraction:
        return None
    return RolloutNeeds(rollout.kv_bytes_per_token, rollout.kv_tokens, rollout.engine_weight_bytes, overhead_bytes,
                        headroom=rollout.headroom, offload_optimizer=offload_optimizer,
                        min_tokens=rollout.min_kv_tokens)


def plan_for_shape(
    shape: TrainingShape,
    model: ModelMemory,
    *,
    budget_bytes: int,
    compute_dtype: torch.dtype,
    optimizer_bytes: int,
    rollout: RolloutMemory | None = None,
    prompts_per_step: int | None = None,
    engine_overhead_bytes: int = 0,
    offload_optimizer: bool = False,
    optimizer_device_bytes: int | None = None,
    autocast_cast_bytes: int = 0,
    activation_bytes_per_token_override: int | None = None,
    reserved_bytes: int = 256 * 1024**2,
    gathered_weight_bytes: int = 0,
    context_bytes: int = 0,
    waves: bool = False,
    grad_bytes: int | None = None,
    cuda: bool | None = None,
    quantized: bool | None = None,
    adapters: bool | None = None,
) -> MemoryPlan:
    """Plan a module's steps.

    Args:
        shape: the module's :class:`TrainingShape`.
        model: its parameters as stored (the reference copy in ``shape.extra_frozen`` included).
        budget_bytes: device memory training may use.
        compute_dtype: the autocast dtype (activation and in-step KV-cache sizes).
        optimizer_bytes: optimizer state in bytes.
        rollout: the colocated engine's needs (None: the module generates in its step, if it generates).
        prompts_per_step: prompts per batch, for the in-step generation estimate.
        engine_overhead_bytes: the engine's workspace beyond weights and KV cache.
        offload_optimizer: optimizer states wait in CPU memory while the engine is awake.
        optimizer_device_bytes: see :func:`~.memory_plan.plan_memory` (states streamed from CPU memory).
        autocast_cast_bytes: autocast's cached compute-dtype copies of fp32 trainable weights.
        activation_bytes_per_token_override: replaces the activation estimate.
        reserved_bytes: kept free for fragmentation and small buffers.
        gathered_weight_bytes: FSDP2's gathered (unsharded) weights held at once in the update
            (:func:`~.memory_plan.fsdp2_gathered_bytes`); ``model`` then counts this process's shards.
        context_bytes: the process's device memory outside PyTorch (see :func:`~.memory_plan.plan_memory`).
        waves: let a colocated engine's KV cache hold less than one rollout (see :func:`~.memory_plan.plan_memory`).
        grad_bytes: the gradients' device bytes (gradients sent to host memory count a little); None: one per
            trainable parameter in its stored dtype.
        cuda: the plan is for a CUDA device; None: whether this machine has CUDA at all. Off CUDA a
            :class:`~.memory_plan.MemoryPlanError` suggests no quantized weights or offloaded checkpoints.
        quantized: the frozen weights are quantized already (the error then suggests no ``quantize``).
        adapters: only LoRA adapters train; None infers it from ``model`` (see :class:`~.memory_plan.RunSettings`).

    Raises:
        MemoryPlanError: a phase cannot fit.
    """
    act = activation_bytes_per_token_override or activation_bytes_per_token(
        shape.model_config, compute_dtype.itemsize, shape.gradient_checkpointing, shape.offload_checkpoints,
        shape.tile_mlps)
    extra: dict[str, int] = {}
    if autocast_cast_bytes:
        # autocast caches a compute-dtype copy of every fp32 weight the grad-enabled forward uses
        # (the backward keeps them anyway) until the cache is cleared after the backward
        extra["autocast weight casts"] = autocast_cast_bytes
    if shape.logprob_chunk_tokens:
        extra["log-prob chunk (fp32 logits)"] = shape.logprob_chunk_tokens * _vocab_size(shape.model_config) * 12
    if gathered_weight_bytes:
        extra["FSDP2 gathered weights (root unit and two layers)"] = gathered_weight_bytes
    if rollout is not None and rollout.weights_kept_asleep_bytes:
        extra["engine weights (kept while the engine sleeps)"] = rollout.weights_kept_asleep_bytes
    if rollout is not None and rollout.beside_training_bytes:
        extra[ENGINE_BESIDE_PART] = rollout.beside_training_bytes
    needs = None
    if shape.generates:
        needs = (in_step_generation_needs(shape, prompts_per_step, compute_dtype) if rollout is None
                 else engine_needs(rollout, engine_overhead_bytes, offload_optimizer))
    settings = RunSettings(adapters=adapters, gradient_checkpointing=shape.gradient_checkpointing,
                           offload_checkpoints=shape.offload_checkpoints,
                           cuda=torch.cuda.is_available() if cuda is None else cuda, quantized=quantized)
    micro = shape.micro_batch_size
    max_tokens = micro * shape.sequence_tokens if micro is not None else (shape.max_micro_batch_tokens
                                                                          or MAX_MICRO_BATCH_TOKENS)
    return plan_memory(budget_bytes=budget_bytes, model=model, activation_bytes_per_token=act,
                       sequence_tokens=shape.sequence_tokens, optimizer_bytes=optimizer_bytes, rollout=needs,
                       max_micro_batch_tokens=max_tokens, extra_train_parts=extra, reserved_bytes=reserved_bytes,
                       optimizer_device_bytes=optimizer_device_bytes, context_bytes=context_bytes,
                       waves=waves and rollout is not None, grad_bytes=grad_bytes, settings=settings)


__all__ = ["engine_needs", "in_step_generation_needs", "plan_for_shape"]
