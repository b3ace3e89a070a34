"""Sizing of the colocated vLLM engine, torch only: its weight dtype and bytes, KV cache, sleep level, sync mode.

Used by the engine, by :class:`~lightning_rl.callbacks.VLLMRollout` and, through the
:class:`~lightning_rl.plugins.rollout_memory.RolloutMemory` the callback registers, by the memory plan. Nothing
here imports vLLM.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_rl.lora import is_lora
from lightning_rl.models import torch_dtype, unwrap
from lightning_rl.plugins.memory_plan import KV_BLOCK_TOKENS, kv_bytes_per_token, rollout_kv_tokens
from lightning_rl.rollout.policy_weights import adapter_sync_unsupported_reason
from lightning_rl.rollout.sharded_weights import full_numel
from lightning_rl.rollout.vllm_settings import KEEP_WEIGHTS_BYTES, EngineSettings, ExecutionMode, LoRASync


def kv_cache_bytes_for(
    config: Any,
    num_prompts: int,
    num_generations: int,
    prompt_length: int,
    max_new_tokens: int,
    dtype: torch.dtype,
    headroom: float = 1.2,
    shared_prompts: bool = True,
    block_size: int = KV_BLOCK_TOKENS,
    tensor_parallel_size: int = 1,
) -> int:
    """KV-cache bytes for one rollout of ``num_prompts * num_generations`` sequences, with headroom.

    Tokens are counted by :func:`~lightning_rl.plugins.memory_plan.rollout_kv_tokens`, as the memory plan counts them.
    With ``tensor_parallel_size = T`` these are one shard's bytes: the group generates the prompts of its ``T``
    processes (``T * num_prompts``), and each shard holds ``1/T`` of the KV heads.

    Args:
        config: the policy's transformers config (layers, KV heads, head size).
        num_prompts: prompts per rollout.
        num_generations: completions per prompt (``G``).
        prompt_length: longest prompt in tokens.
        max_new_tokens: completion limit in tokens.
        dtype: KV-cache dtype (the engine's weight dtype).
        headroom: multiplier on top of the exact need (>= 1).
        shared_prompts: the prompt blocks are shared by the ``G`` completions (prefix caching).
        block_size: tokens per KV block.
        tensor_parallel_size: processes (GPUs) that share one engine.
    """
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    tokens = rollout_kv_tokens(num_prompts * tensor_parallel_size, num_generations, prompt_length, max_new_tokens,
                               shared_prompts, block_size)
    dtype_bytes = dtype.itemsize
    return int(math.ceil(tokens * headroom)) * kv_bytes_per_token(config, dtype_bytes, tensor_parallel_size)


def kv_cache_dtype(settings: EngineSettings, engine_dtype: torch.dtype) -> torch.dtype:
    """The engine's KV-cache dtype: the weights' dtype, or 8 bits when ``engine_kwargs`` asks vLLM for an fp8 cache.

    ``EngineSettings(engine_kwargs={"kv_cache_dtype": "fp8"})`` halves a bf16 cache; the memory plan and the
    KV-cache budget count it at one byte an element then.
    """
    asked = str(settings.engine_kwargs.get("kv_cache_dtype", "auto"))
    return torch.float8_e4m3fn if asked.startswith("fp8") else engine_dtype


def execution_kwargs(execution: ExecutionMode) -> dict[str, Any]:
    """``vllm.LLM`` arguments for an execution mode (see :class:`~.vllm_settings.EngineSettings`)."""
    if execution == "eager":
        return {"enforce_eager": True}
    if execution == "cuda_graphs":  # full graphs for pure-decode batches, no torch.compile (mode 0)
        return {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}
    return {"enforce_eager": False}


def engine_weight_dtype(
    model: nn.Module, dtype: str | torch.dtype = "auto", compute_dtype: torch.dtype | None = None,
    adapter: bool = False,
) -> torch.dtype:
    """The dtype the engine holds the policy's weights (and its KV cache) in.

    Args:
        model: the policy.
        dtype: an explicit dtype, or ``"auto"``: the trainer's ``compute_dtype`` when it computes in 16
            bits (mixed precision: fp32 master weights, bf16 matrix products), else the policy's own dtype.
        compute_dtype: the trainer's compute dtype (see :func:`~lightning_rl.plugins.dtypes.trainer_compute_dtype`).
        adapter: LoRA adapters are pushed as tensors: vLLM's LoRA kernels take 16-bit adapters only, so
            ``"auto"`` never resolves to fp32 then (bf16), and an explicit fp32 is refused.

    Raises:
        ValueError: ``dtype="float32"`` with ``adapter=True``.
    """
    resolved = (compute_dtype or next(unwrap(model).parameters()).dtype) if dtype == "auto" else torch_dtype(dtype)
    if adapter and resolved not in (torch.bfloat16, torch.float16):
        if dtype != "auto":
            raise ValueError(f"vLLM's LoRA kernels need a 16-bit engine, got dtype={dtype!r}: use dtype='bfloat16' "
                             "(the adapter tensors are cast to it), or lora_sync='merged' to push merged weights")
        resolved = torch.bfloat16
    return resolved


def engine_weight_bytes(
    model: nn.Module, dtype: str | torch.dtype = "auto", compute_dtype: torch.dtype | None = None,
    adapter: bool = False, tensor_parallel_size: int = 1, root: nn.Module | None = None,
) -> int:
    """Size of this process's copy of the policy's weights in the engine (see :func:`engine_weight_dtype`).

    With ``tensor_parallel_size = T`` each process holds one shard: ``1/T`` of the weights (rounded up).
    Parameters sharded by FSDP count at their full size (``root``: the module holding FSDP1 units around the
    policy, see :func:`~lightning_rl.rollout.sharded_weights.full_numel`).
    """
    itemsize = engine_weight_dtype(model, dtype, compute_dtype, adapter).itemsize
    total = full_numel(unwrap(model), root) * itemsize
    return -(-total // tensor_parallel_size)


def _frozen_base_bytes(model: nn.Module, engine_dtype: torch.dtype, frozen_dtype: torch.dtype | None) -> int:
    """The frozen LoRA base in the engine's dtype, when the trainer keeps it in that dtype (else 0: not shareable)."""
    from lightning_rl.rollout.shared_weights import frozen_base_parameters

    if frozen_dtype != engine_dtype:
        return 0
    return sum(p.numel() for p in frozen_base_parameters(model).values()) * engine_dtype.itemsize


def shared_base_bytes(
    model: nn.Module, settings: EngineSettings, engine_dtype: torch.dtype, frozen_dtype: torch.dtype | None,
    sharded: bool = False,
) -> int:
    """Bytes of an in-process engine's weights that the trainer's frozen LoRA base will point at (held once).

    The engine shares them (:mod:`~lightning_rl.rollout.shared_weights`) when it takes the adapter as tensors,
    ``share_base_weights`` is not False, each engine is one process's (no tensor parallelism, no FSDP shards),
    and the trainer keeps its frozen weights in the engine's dtype (``frozen_dtype``). 0 otherwise.
    """
    lora_mode, _ = lora_sync_mode(model, settings.lora_sync)
    if lora_mode != "adapter" or settings.share_base_weights is False or settings.tensor_parallel_size != 1:
        return 0
    return 0 if sharded else _frozen_base_bytes(model, engine_dtype, frozen_dtype)


def merged_base_bytes(model: nn.Module, settings: EngineSettings, engine_dtype: torch.dtype,
                      frozen_dtype: torch.dtype | None) -> int:
    """Bytes of an engine process's weights that the trainer's frozen LoRA base will point at (held once).

    With ``share_merged_base`` (:mod:`~lightning_rl.rollout.merged_base`) the trainer's frozen base is the engine
    process's merged weights, when the trainer keeps its frozen weights in the engine's dtype. 0 otherwise.
    """
    if not settings.share_merged_base or not is_lora(model):
        return 0
    return _frozen_base_bytes(model, engine_dtype, frozen_dtype)


def lora_sync_mode(model: nn.Module, lora_sync: LoRASync) -> tuple[str | None, str | None]:
    """How the policy's weights reach the engine: ``(mode, reason)``.

    ``mode`` is None for a policy without LoRA (full weights), ``"adapter"`` or ``"merged"``;
    ``reason`` says why vLLM cannot take the adapter as tensors (None when it can).
    """
    if not is_lora(model):
        return None, None
    reason = adapter_sync_unsupported_reason(model)
    return ("merged" if lora_sync == "merged" or reason else "adapter"), reason


def auto_sleep_level(lora_mode: str | None, weight_bytes: int, keep_weights_bytes: int = KEEP_WEIGHTS_BYTES) -> int:
    """The sleep level ``sleep_level=None`` picks.

    Args:
        lora_mode: ``"adapter"`` (only LoRA tensors are pushed), ``"merged"`` or None (full weights).
        weight_bytes: size of the engine's weights.
        keep_weights_bytes: largest weights kept on the GPU while asleep.

    Returns:
        1 for adapter sync (the base weights wait in CPU memory, they never change); for full or
        merged pushes, 0 (KV cache only) when the weights fit ``keep_weights_bytes``, else 2 (the
        weights are dropped: the next sync pushes all of them anyway).
    """
    if lora_mode == "adapter":
        return 1
    return 0 if weight_bytes <= keep_weights_bytes else 2


def engine_sleep_level(lora_mode: str | None, weight_bytes: int, settings: EngineSettings) -> int:
    """``settings.sleep_level``, or :func:`auto_sleep_level` when it is None."""
    if settings.sleep_level is not None:
        return settings.sleep_level
    return auto_sleep_level(lora_mode, weight_bytes, settings.keep_weights_bytes)


def weights_kept_asleep_bytes(
    model: nn.Module, settings: EngineSettings, compute_dtype: torch.dtype | None = None,
    root: nn.Module | None = None,
) -> int:
    """Bytes of the engine's weights that stay on the GPU while it sleeps (full or merged pushes at level 0)."""
    lora_mode, _ = lora_sync_mode(model, settings.lora_sync)
    if lora_mode == "adapter":
        return 0
    weight_bytes = engine_weight_bytes(model, settings.dtype, compute_dtype,
                                       tensor_parallel_size=settings.tensor_parallel_size, root=root)
    return weight_bytes if engine_sleep_level(lora_mode, weight_bytes, settings) == 0 else 0


def sequences_at_once(
    kv_cache_bytes: int, kv_bytes_per_token: int, sequence_tokens: int, sequences: int,
    tensor_parallel_size: int = 1, block_size: int = KV_BLOCK_TOKENS,
) -> int:
    """How many of this process's ``sequences`` an engine holds at once, each to its full length.

    The ``max_num_seqs`` of an engine whose KV cache is smaller than one rollout (the memory plan's waves): vLLM
    then never has to preempt a sequence it started, and starts the next ones as earlier ones finish.

    Args:
        kv_cache_bytes: the engine's KV cache (one shard's under tensor parallelism).
        kv_bytes_per_token: KV bytes per token (one shard's).
        sequence_tokens: the longest prompt plus the completion limit.
        sequences: this process's sequences of one rollout (prompts x G).
        tensor_parallel_size: processes that share the engine; its cache holds the whole group's sequences.
        block_size: tokens per KV block (a sequence may waste one).
    """
    whole = kv_cache_bytes // max(1, (sequence_tokens + block_size) * kv_bytes_per_token)
    return int(max(1, min(sequences, whole // max(1, tensor_parallel_size))))


__all__ = [
    "auto_sleep_level",
    "engine_sleep_level",
    "engine_weight_bytes",
    "engine_weight_dtype",
    "execution_kwargs",
    "kv_cache_bytes_for",
    "kv_cache_dtype",
    "lora_sync_mode",
    "merged_base_bytes",
    "sequences_at_once",
    "shared_base_bytes",
    "weights_kept_asleep_bytes",
]
