"""The colocated vLLM engine's settings: documented once, taken by :class:`~lightning_rl.rollout.vllm.VLLMEngine`
and :class:`~lightning_rl.callbacks.VLLMRollout`, and parsed from YAML by LightningCLI (``settings:`` under the
callback's ``init_args``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lightning_rl.models import torch_dtype

LoRASync = Literal["auto", "adapter", "merged"]
LORA_SYNC_MODES: tuple[str, ...] = get_args(LoRASync)
ExecutionMode = Literal["eager", "cuda_graphs", "compiled"]
EXECUTION_MODES: tuple[str, ...] = get_args(ExecutionMode)
FrontEnd = Literal["trainer", "process"]
FRONT_ENDS: tuple[str, ...] = get_args(FrontEnd)
KVPromptTokens = Literal["limit", "data"]
KV_PROMPT_TOKENS: tuple[str, ...] = get_args(KVPromptTokens)

#: Automatic sleep level: engines whose weights take at most this many bytes keep them on the GPU while asleep
#: (level 0). Unmapping and remapping the weights costs time at every toggle, while small weights take little
#: memory next to training's (``bench/results/rollout_NOTES.md`` has the measured toggles).
KEEP_WEIGHTS_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineSettings:
    """How the vLLM engine holds the policy, sleeps, runs and sizes its KV cache.

    Args:
        dtype: engine weight and KV-cache dtype. ``auto``: under :class:`~lightning_rl.callbacks.VLLMRollout` the
            trainer's compute dtype when it computes in 16 bits (bf16 for ``bf16-mixed`` and
            :class:`~lightning_rl.plugins.MemoryAwarePrecision`), else the policy's own dtype; never fp32 for LoRA
            adapters pushed as tensors (vLLM's LoRA kernels take 16 bits; see
            :func:`~lightning_rl.rollout.vllm_sizing.engine_weight_dtype`).
        lora_sync: ``adapter`` (push the LoRA tensors only), ``merged`` (push ``W + BA``), or ``auto`` (adapter
            when vLLM can take it, else merged).
        sleep_level: 0 releases only the KV cache (the weights stay on the GPU: the cheapest toggle), 1 also keeps
            a CPU copy of the weights while asleep, 2 drops them (pushed again at the next sync). None:
            :func:`~lightning_rl.rollout.vllm_sizing.auto_sleep_level`. Ignored while the base weights are
            shared: the engine then sleeps by releasing its KV cache only.
        keep_weights_bytes: with ``sleep_level=None``, the largest engine weights kept on the GPU while asleep.
        share_base_weights: with adapter-only LoRA sync, point the trainer's frozen base weights at the engine's
            copy so the GPU holds them once (:mod:`lightning_rl.rollout.shared_weights`). None: when possible
            (same dtype, a known weight layout); True: raise when impossible; False: never.
        share_merged_base: for an engine in a process of its own
            (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`, which merges a LoRA policy's adapters
            into its weights), point the trainer's frozen LoRA base at those merged weights and free the trainer's
            copy (:mod:`lightning_rl.rollout.merged_base`). It needs plain LoRA without dropout, the frozen base in
            the engine's dtype, no reference model (``beta=0``) and one optimizer step per rollout
            (``num_iterations=1``, ``num_mini_batches=1``). None: :class:`~lightning_rl.callbacks.VLLMRollout`
            turns it on when all hold (an engine built outside the callback leaves it off); True: raise when
            impossible; False: never.
        share_trained_weights: for an engine in a process of its own and a full fine-tune whose fp32 masters live
            in host memory (``MemoryAwarePrecision``'s host masters), point the trainer's 16-bit trainable weights
            at the engine's and free the trainer's copy (:mod:`lightning_rl.rollout.shared_trained_weights`): each
            optimizer step's results wait in pinned host memory until the next sync copies them in. It needs the
            weights in the engine's dtype and one optimizer step per rollout (``num_iterations=1``,
            ``num_mini_batches=1``). None (default): when possible (:class:`~lightning_rl.callbacks.VLLMRollout`
            checks the module and the plugin's masters, the engine process the weights' layout, and a message says
            why not); True: raise when impossible; False: never. On an H200 (2026-12-05) it took the Qwen2.5-0.5B
            shape's peak from 5.52 to 4.66 GiB.
        execution: ``cuda_graphs``: decode steps replay full CUDA graphs, no torch.compile (starts in seconds);
            ``compiled``: vLLM's torch.compile + piecewise CUDA graphs (minutes to start); ``eager``: neither
            (fastest start, slowest generation).
        fp32_logits: compute the LM head in fp32 (16-bit inputs, fp32 output) as the trainer's log-prob kernel
            does, so the sampling log-probs come from logits never rounded to 16 bits.
        enable_prefix_caching: the ``G`` completions of a prompt share its KV blocks.
        kv_cache_bytes: KV-cache size. None: from the memory plan when the trainer has
            :class:`~lightning_rl.plugins.MemoryAwarePrecision`, else from the rollout's shape with
            ``kv_cache_headroom`` (:func:`~lightning_rl.rollout.vllm_sizing.kv_cache_bytes_for`).
        kv_cache_headroom: multiplier (>= 1) on the KV cache computed from the rollout's shape. That count is
            exact for the worst case (every completion to its limit at once, a partly filled block each, the
            prompt blocks shared by the ``G`` completions), so 1.0 (default) needs no margin; a rollout that
            outgrew it would make vLLM pause a sequence and compute it again later, slower but the same tokens.
        kv_prompt_tokens: the prompt length the KV cache is sized for. ``data`` (default): the longest prompt of
            the DataModule's rows, rendered once at setup
            (:func:`~lightning_rl.rollout.data_prompts.longest_prompt_tokens`), or the limit when the DataModule
            keeps no rows or more than 50,000 (50,000 short prompts render in about 14 s on a 2-core CPU); longer
            prompts are still accepted (the engine's length limit stays). ``limit``: the module's
            ``max_prompt_length``. On an H200 the README's configuration peaked 0.23 GiB lower with ``data`` at
            the same rewards.
        gpu_memory_utilization: size vLLM by its fraction of the GPU instead (the three KV settings above are
            ignored).
        seed: vLLM's sampling seed.
        tensor_parallel_size: GPUs one engine is sharded over, for a policy whose engine does not fit one GPU.
            Needs ``torch.distributed`` (Lightning's ``strategy="ddp"`` or ``"fsdp"``, one process per GPU) with a
            number of processes it divides; groups of consecutive ranks share an engine, which generates the
            group's prompts together (:mod:`~lightning_rl.rollout.tensor_parallel`).
        front_end: for an engine in a process of its own
            (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`), where vLLM's front end runs: the loop
            that receives each decode step's outputs from the engine core. ``process`` (the default): in a CPU-only
            process of its own, which hands back each rollout in one message
            (:mod:`~lightning_rl.rollout.front_end_process`), so the update beside it keeps the trainer's
            interpreter (on an H200, SmolLM2's GRPO step 0.42-0.48 s against 0.47-0.54 s); ``trainer``: in the
            trainer's process (the rollout thread, beside the update).
        engine_kwargs: more ``vllm.LLM`` arguments (they override the ones these settings give).
    """

    dtype: str = "auto"
    lora_sync: LoRASync = "auto"
    sleep_level: int | None = None
    keep_weights_bytes: int = KEEP_WEIGHTS_BYTES
    share_base_weights: bool | None = None
    share_merged_base: bool | None = None
    share_trained_weights: bool | None = None
    execution: ExecutionMode = "cuda_graphs"
    fp32_logits: bool = True
    enable_prefix_caching: bool = True
    kv_cache_bytes: int | None = None
    kv_cache_headroom: float = 1.0
    kv_prompt_tokens: KVPromptTokens = "data"
    gpu_memory_utilization: float | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    front_end: FrontEnd = "process"
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            torch_dtype(self.dtype)  # raises ValueError naming the accepted names
        if self.lora_sync not in LORA_SYNC_MODES:
            raise ValueError(f"lora_sync must be one of {LORA_SYNC_MODES}, got {self.lora_sync!r}")
        if self.execution not in EXECUTION_MODES:
            raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {self.execution!r}")
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"front_end must be one of {FRONT_ENDS}, got {self.front_end!r}")
        if self.sleep_level not in (None, 0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1, 2 or None (automatic), got {self.sleep_level}")
        if self.kv_prompt_tokens not in KV_PROMPT_TOKENS:
            raise ValueError(f"kv_prompt_tokens must be one of {KV_PROMPT_TOKENS}, got {self.kv_prompt_tokens!r}")
        if self.kv_cache_headroom < 1:
            raise ValueError(f"kv_cache_headroom must be >= 1, got {self.kv_cache_headroom}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0 (or None), got {self.kv_cache_bytes}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (or None), got {self.gpu_memory_utilization}")


__all__ = ["EXECUTION_MODES", "FRONT_ENDS", "KEEP_WEIGHTS_BYTES", "KV_PROMPT_TOKENS", "LORA_SYNC_MODES",
           "EngineSettings", "ExecutionMode", "FrontEnd", "KVPromptTokens", "LoRASync"]
