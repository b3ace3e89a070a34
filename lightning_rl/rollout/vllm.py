"""Colocated vLLM rollout engine: an in-process ``vllm.LLM`` on the policy's GPU, fed the policy's weights.

The engine is built from the policy's *config* only (``load_format="dummy"``) and then receives
the weights from the live policy through the vLLM model's ``load_weights``, so a model that
exists only in memory (loaded from GGUF, just modified, or being trained) works. Sleep mode
lets it hand its memory (weights and KV cache) back to training between rollouts.

LoRA policies sync only their adapter tensors (in memory, no merge, no disk) into vLLM's LoRA
manager; when vLLM cannot take the adapter (DoRA, ``modules_to_save``, biases, rank patterns),
the merged weights ``W + B A * scale`` are pushed instead.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_rl.lora import is_lora
from lightning_rl.models import torch_dtype, unwrap
from lightning_rl.plugins.memory_plan import kv_bytes_per_token, rollout_kv_tokens
from lightning_rl.prompting import PromptTooLongError
from lightning_rl.rollout.engine import Rollout, SamplingConfig
from lightning_rl.rollout.padding import left_pad, right_pad
from lightning_rl.rollout.policy_weights import (
    adapter_sync_unsupported_reason,
    adapter_tensors,
    base_weights,
    full_weights,
    merged_lora_weights,
    vllm_lora_rank,
)
from lightning_rl.rollout.shared_weights import (
    SharedBaseWeights,
    release_kv_cache,
    restore_kv_cache,
    share_base_with_engine,
)

log = logging.getLogger(__name__)

_VLLM_AVAILABLE = RequirementCache("vllm")
LoRASync = Literal["auto", "adapter", "merged"]
LORA_SYNC_MODES: tuple[str, ...] = ("auto", "adapter", "merged")
ExecutionMode = Literal["eager", "cuda_graphs", "compiled"]
EXECUTION_MODES: tuple[str, ...] = ("eager", "cuda_graphs", "compiled")
_LORA_ID = 1
_LORA_NAME = "lightning-rl-policy"
_LORA_PATH = "in-memory://lightning-rl-policy"  # never read: the adapter is installed from tensors


_ENGINE_STARTED_IN_PROCESS = False  # vLLM's sleep-mode allocator serves one engine per process


class UnsupportedArchitectureError(ValueError):
    """vLLM has no implementation of the policy's architecture."""


def require_vllm() -> None:
    """Raise a clear error when vllm is not installed."""
    if not _VLLM_AVAILABLE:
        raise ModuleNotFoundError(
            "The vLLM rollout engine needs the 'vllm' package, which is not installed. Install it with "
            "pip install 'lightning-rl[vllm]', or drop the VLLMRollout callback to generate with "
            "transformers (the module's default engine)."
        )


def require_cuda() -> None:
    """Raise a clear error when no CUDA device is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "The vLLM rollout engine needs a CUDA GPU, and none is visible (torch.cuda.is_available() is "
            "False). Run on a GPU machine, or drop the VLLMRollout callback to generate with transformers "
            "(the module's default engine, which also runs on a CPU)."
        )


def check_architecture(architecture: str, supported: Collection[str], model_impl: str | None = None) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless vLLM implements ``architecture``."""
    if model_impl == "transformers" or architecture in supported:
        return
    raise UnsupportedArchitectureError(
        f"vLLM has no implementation of the architecture {architecture!r}. Use a model vLLM supports "
        "(https://docs.vllm.ai/en/latest/models/supported_models.html), try vLLM's transformers backend with "
        "VLLMRollout(engine_kwargs={'model_impl': 'transformers'}), or drop the VLLMRollout callback to "
        "generate with transformers."
    )


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], max_model_len: int) -> None:
    """Raise :class:`PromptTooLongError` for a prompt that leaves no room for a completion token."""
    for i, p in enumerate(prompt_ids):
        if len(p) >= max_model_len:
            raise PromptTooLongError(
                f"prompt {i} has {len(p)} tokens, but the vLLM engine's max_model_len is {max_model_len} "
                "(prompt + completion). Raise it with VLLMRollout(max_model_len=...), or lower the module's "
                "max_prompt_length (with truncate_prompts=True to cut long prompts)."
            )


def kv_cache_bytes_for(
    config: Any,
    num_prompts: int,
    num_generations: int,
    prompt_length: int,
    max_new_tokens: int,
    dtype: torch.dtype,
    headroom: float = 1.2,
    shared_prompts: bool = True,
    block_size: int = 16,
) -> int:
    """KV-cache bytes for one rollout of ``num_prompts * num_generations`` sequences, with headroom.

    With prefix caching the ``G`` completions of a prompt share its prompt blocks, so the
    prompt is counted once per prompt. Every sequence may waste one partly filled block.

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
    """
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    tokens = rollout_kv_tokens(num_prompts, num_generations, prompt_length, max_new_tokens, shared_prompts, block_size)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return int(math.ceil(tokens * headroom)) * kv_bytes_per_token(config, dtype_bytes)


def execution_kwargs(execution: ExecutionMode) -> dict[str, Any]:
    """``vllm.LLM`` arguments for an execution mode (see :class:`VLLMEngine`)."""
    if execution == "eager":
        return {"enforce_eager": True}
    if execution == "cuda_graphs":  # full graphs for pure-decode batches, no torch.compile (mode 0)
        return {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}
    return {"enforce_eager": False}


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token from a vLLM completion's ``logprobs`` (flat or per-position dicts)."""
    if not logprobs:
        return [0.0] * len(token_ids)
    if hasattr(logprobs, "start_indices"):  # vllm.logprobs.FlatLogprobs: the sampled token comes first
        flat_ids, values = logprobs.token_ids, logprobs.logprobs
        out = []
        for start, tok in zip(logprobs.start_indices, token_ids):
            if flat_ids[start] != tok:
                raise RuntimeError(f"vLLM returned the log-prob of token {flat_ids[start]} for sampled token {tok}")
            out.append(float(values[start]))
        return out
    return [float(step[tok].logprob) for step, tok in zip(logprobs, token_ids)]


#: Automatic sleep level: engines whose weights take at most this many bytes keep them on the GPU while
#: asleep (level 0). Unmapping and remapping the weights' allocations costs tens of milliseconds per step
#: (SmolLM2-135M on an H100: a 58 ms toggle with level 2, 21 ms with level 0), while small weights'
#: memory is little next to training's.
KEEP_WEIGHTS_BYTES = 1 << 30


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
    adapter: bool = False,
) -> int:
    """Size of the engine's copy of the policy's weights (see :func:`engine_weight_dtype`)."""
    itemsize = engine_weight_dtype(model, dtype, compute_dtype, adapter).itemsize
    return sum(p.numel() for p in unwrap(model).parameters()) * itemsize


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


class VLLMEngine:
    """A vLLM engine in this process, on this GPU, generating with the policy's current weights.

    Args:
        model: the policy (a transformers causal LM, or a peft LoRA wrapper of one).
        eos_token_ids: ids that end a completion.
        pad_token_id: id used to pad prompts and completions in the returned :class:`Rollout`.
        max_model_len: longest prompt + completion in tokens.
        max_num_seqs: sequences vLLM runs at once (the rollout's ``prompts * G``).
        kv_cache_bytes: KV-cache size in bytes (see :func:`kv_cache_bytes_for`); None uses
            ``gpu_memory_utilization`` instead.
        gpu_memory_utilization: vLLM's fraction of the GPU when ``kv_cache_bytes`` is None.
        dtype: engine weight dtype; ``auto`` takes the policy's (bf16 for LoRA adapters pushed as tensors:
            vLLM's LoRA kernels need 16 bits; see :func:`engine_weight_dtype`).
        lora_sync: ``adapter`` (LoRA tensors only), ``merged`` (push ``W + BA``), or ``auto``
            (adapter when vLLM can take it, else merged).
        sleep_level: 0 releases only the KV cache (the weights stay on the GPU: the cheapest toggle, for
            small models), 1 also keeps a CPU copy of the weights while asleep, 2 drops them (they are
            pushed again at the next sync). None: :func:`auto_sleep_level` (1 when only an adapter is
            pushed; with full pushes 0 for weights up to ``keep_weights_bytes``, else 2). Ignored while
            the base weights are shared: the engine then sleeps by releasing its KV cache only.
        keep_weights_bytes: with ``sleep_level=None``, the largest engine weights kept on the GPU while asleep.
        share_base_weights: with adapter-only LoRA sync, point the trainer's frozen base weights at
            the engine's copy so the GPU holds them once (see :mod:`lightning_rl.rollout.shared_weights`).
            None: share when possible (same dtype and a known weight layout), True: raise when
            impossible, False: never.
        execution: ``cuda_graphs`` (default): decode steps replay full CUDA graphs, no torch.compile, so
            the engine starts in seconds and the small-batch decode loop is not bound by kernel launches;
            ``compiled``: vLLM's torch.compile + piecewise CUDA graphs (minutes to start);
            ``eager``: neither (fastest start, slowest generation).
        fp32_logits: compute the LM head in fp32 (bf16 inputs, fp32 output), as the trainer's log-prob
            kernel does, so the sampling log-probs come from logits that were never rounded to bf16.
        seed: vLLM's sampling seed.
        enable_prefix_caching: share the prompt's KV blocks between its ``G`` completions.
        engine_kwargs: more ``vllm.LLM`` arguments (override the ones above).
    """

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        lora_sync: LoRASync = "auto",
        sleep_level: int | None = None,
        execution: ExecutionMode = "cuda_graphs",
        fp32_logits: bool = True,
        share_base_weights: bool | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        keep_weights_bytes: int = KEEP_WEIGHTS_BYTES,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        require_vllm()
        require_cuda()
        if lora_sync not in LORA_SYNC_MODES:
            raise ValueError(f"lora_sync must be one of {LORA_SYNC_MODES}, got {lora_sync!r}")
        if execution not in EXECUTION_MODES:
            raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {execution!r}")
        if sleep_level not in (None, 0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1, 2 or None (automatic), got {sleep_level}")
        if not eos_token_ids:
            raise ValueError("VLLMEngine needs at least one EOS token id to know where completions end")
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_model_len = int(max_model_len)
        self.lora_sync = lora_sync
        self.lora_mode, reason = lora_sync_mode(model, lora_sync)
        if lora_sync == "adapter" and reason:
            raise ValueError(f"lora_sync='adapter' is impossible for this adapter: {reason}; use 'merged'")
        if reason and lora_sync == "auto":
            log.warning("vLLM cannot take this LoRA adapter as tensors (%s): pushing merged weights", reason)
        if share_base_weights and self.lora_mode != "adapter":
            raise ValueError("share_base_weights=True needs a LoRA policy synced as an adapter (lora_sync='adapter' "
                             f"or 'auto'); this engine would push {self.lora_mode or 'full'} weights")
        import vllm
        from vllm.model_executor.models import ModelRegistry

        self.vllm_version = vllm.__version__

        base = unwrap(model)
        config = copy.deepcopy(base.config)
        arch = (getattr(config, "architectures", None) or [type(base).__name__])[0]
        extra = dict(engine_kwargs or {})
        check_architecture(arch, ModelRegistry.get_supported_archs(), extra.get("model_impl"))
        config.architectures = [arch]
        quant = getattr(config, "quantization_config", None)
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if quant is not None and str(method).lower().endswith("gguf"):
            del config.quantization_config  # a GGUF file de-quantized on load: the weights in memory are plain
        adapter = self.lora_mode == "adapter"
        weight_dtype = engine_weight_dtype(model, dtype, adapter=adapter)
        self.weight_dtype = weight_dtype
        self.weight_bytes = engine_weight_bytes(model, dtype, adapter=adapter)
        if sleep_level is None:
            sleep_level = auto_sleep_level(self.lora_mode, self.weight_bytes, keep_weights_bytes)
        self.sleep_level = sleep_level
        if fp32_logits and weight_dtype != torch.float32:
            config.head_dtype = "float32"  # read by vLLM's LogitsProcessor (vLLM >= 0.26)
        self.execution = execution

        self._dir = tempfile.mkdtemp(prefix="lightning-rl-vllm-")
        config.save_pretrained(self._dir)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process
        free, total = torch.cuda.mem_get_info()
        kwargs: dict[str, Any] = dict(
            model=self._dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",
            dtype=str(weight_dtype).removeprefix("torch."),
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=True,
            **execution_kwargs(execution),
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
            seed=seed,
        )
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
            # vLLM still checks that this fraction of the GPU is free at start; keep it below what is free
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization or max(0.01, min(0.9, 0.9 * free / total))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization or 0.3
        if self.lora_mode == "adapter":
            r = model.peft_config[model.active_adapter].r
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(r))
        kwargs.update(extra)
        self.engine_kwargs = kwargs
        self._dist_was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        global _ENGINE_STARTED_IN_PROCESS
        if _ENGINE_STARTED_IN_PROCESS:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise RuntimeError(
                "a vLLM engine with sleep mode was already started in this process, and vLLM's CuMem allocator "
                "allows only one per process (even after shutdown): keep one VLLMRollout/VLLMEngine per process, "
                "or run each fit that needs a new engine in its own process"
            )
        _ENGINE_STARTED_IN_PROCESS = True
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.startup_time = time.perf_counter() - t0
        self._sleeping = False
        self._kv_asleep = False
        self._weights_lost = False
        self._base_synced = False
        self._lora_model = None
        self._lora_request = None
        self._kv_released = False
        self.shared = SharedBaseWeights()
        self.shared_freed_bytes = 0
        self.sync_weights(model)
        if self.lora_mode == "adapter" and share_base_weights is not False:
            self._share_base(model, required=bool(share_base_weights))

    def _share_base(self, model: nn.Module, required: bool) -> None:
        before = torch.cuda.memory_allocated()
        shared, reason = share_base_with_engine(model, self._runner().get_model())
        if reason:
            if required:
                self.shutdown()
                raise ValueError(f"share_base_weights=True, but the base weights cannot be shared: {reason}")
            log.info("LoRA base weights not shared with the vLLM engine (%s): the GPU holds two copies", reason)
            return
        self.shared = shared
        gc.collect()
        torch.cuda.empty_cache()
        self.shared_freed_bytes = before - torch.cuda.memory_allocated()  # the trainer's copy, now gone
        log.info("LoRA base weights shared with the vLLM engine: %.1f MiB held once", shared.bytes_shared / 2**20)

    # ----------------------------------------------------------------------------- vLLM internals
    def _runner(self) -> Any:
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        except AttributeError as err:
            raise RuntimeError(
                "cannot reach the vLLM model in this process; the engine must run in-process "
                f"(VLLM_ENABLE_V1_MULTIPROCESSING=0) with one GPU (vllm {self.vllm_version})"
            ) from err

    @contextlib.contextmanager
    def _unwrapped_lora_layers(self, model: nn.Module) -> Iterator[None]:
        """Put vLLM's LoRA wrappers' base layers in place, so ``load_weights`` sees the plain model."""
        swapped = []
        for name, module in list(model.named_modules()):
            if name and hasattr(module, "base_layer") and hasattr(module, "set_lora"):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                swapped.append((parent, child, module))
        try:
            for parent, child, module in swapped:
                setattr(parent, child, module.base_layer)
            yield
        finally:
            for parent, child, module in swapped:
                setattr(parent, child, module)

    @torch.no_grad()
    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        vmodel = self._runner().get_model()
        with self._unwrapped_lora_layers(vmodel):
            vmodel.load_weights(weights)
        torch.cuda.synchronize()

    def _install_adapter(self, model: nn.Module) -> None:
        """Put the adapter's tensors into vLLM's LoRA manager under a fixed id (replacing the last ones)."""
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        tensors, config = adapter_tensors(model)
        tensors = {k: v.to(self.weight_dtype) for k, v in tensors.items()}  # fp32 masters -> the engine's 16 bits
        manager = self._runner().lora_manager
        adapters = manager._adapter_manager
        config["vllm_max_position_embeddings"] = getattr(manager, "max_position_embeddings", None)
        helper = PEFTHelper.from_dict(config)
        helper.validate_legal(manager.lora_config)
        vmodel = adapters.model
        mapper = getattr(vmodel, "hf_to_vllm_mapper", None)
        if mapper is not None and hasattr(mapper, "get_unstacked_mapper"):
            mapper = mapper.get_unstacked_mapper()
        lora = manager._lora_model_cls.from_lora_tensors(
            lora_model_id=_LORA_ID, tensors=tensors, peft_helper=helper, device="cuda",
            dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size, weights_mapper=mapper,
            skip_prefixes=getattr(vmodel, "lora_skip_prefixes", None),
        )
        if not lora.loras:
            raise RuntimeError("none of the adapter's tensors matched a vLLM LoRA module")
        adapters.remove_adapter(_LORA_ID)
        adapters.add_adapter(lora)
        adapters.activate_adapter(_LORA_ID)
        if self._lora_model is None:  # if vLLM ever evicts it, load it back from memory, not from a path
            original = manager._load_adapter

            def load_adapter(request: Any, _original: Any = original) -> Any:
                if request.lora_int_id == _LORA_ID and self._lora_model is not None:
                    return self._lora_model
                return _original(request)

            manager._load_adapter = load_adapter
        self._lora_model = lora
        self._lora_request = LoRARequest(_LORA_NAME, _LORA_ID, _LORA_PATH)

    # ----------------------------------------------------------------------------- RolloutEngine
    @property
    def needs_sync(self) -> bool:
        """True when the engine holds no valid weights (after a level-2 sleep) until the next sync."""
        return self._weights_lost

    @property
    def is_sleeping(self) -> bool:
        """Whether the engine's memory is released."""
        return self._sleeping or self._kv_asleep or self._kv_released

    def sync_weights(self, model: nn.Module) -> None:
        """Push ``model``'s current weights (or only its LoRA adapter) into the engine."""
        self._check_alive()
        if self.shared.views and self.lora_mode != "adapter":
            self.shared.unshare()  # pushing full or merged weights would overwrite the trainer's base
        self._wake_weights()
        if self.lora_mode == "adapter":
            if self._weights_lost or not self._base_synced:
                self._load(base_weights(model))
                self._base_synced = True
            try:
                self._install_adapter(model)
            except Exception as err:
                if self.lora_sync != "auto":
                    raise
                log.warning("adapter-only LoRA sync failed (%s); pushing merged weights from now on", err)
                self.lora_mode, self._lora_request = "merged", None
                self.shared.unshare()
                self._load(merged_lora_weights(model))
        elif self.lora_mode == "merged":
            self._lora_request = None  # generate with the merged weights, no adapter on top
            self._load(merged_lora_weights(model))
        else:
            self._load(full_weights(model))
        self._weights_lost = False
        if not (self._kv_asleep or self._kv_released):
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def _wake_weights(self) -> None:
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
            self._sleeping = False
            self._kv_asleep = True

    def _wake_kv(self) -> None:
        if self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        if self._kv_released:
            restore_kv_cache(self._runner())
            self._kv_released = False
            self.llm.reset_prefix_cache()  # the KV memory came back uninitialised

    def wake_up(self) -> None:
        """Take the weights' memory back (the KV cache follows at the first ``generate``)."""
        self._check_alive()
        self._wake_weights()

    def sleep(self, level: int | None = None) -> None:
        """Release the engine's memory: level 0 the KV cache only, level 1 also moves the weights to CPU
        memory, level 2 drops the weights too.

        With shared base weights only the KV cache is released (the trainer reads the weights).
        """
        self._check_alive()
        level = self.sleep_level if level is None else level
        if self.shared.views or level == 0:
            if not (self._kv_released or self._sleeping):
                release_kv_cache()  # CuMem memory goes straight back to the driver: no empty_cache needed
                self._kv_released = True
            return
        if self._sleeping:
            return
        self._wake_kv()
        self.llm.sleep(level=level)  # vLLM's allocator runs gc.collect() and empty_cache() itself
        self._sleeping = True
        self._weights_lost = self._weights_lost or level == 2

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, num_generations: int = 1,
        seed: int | None = None,
    ) -> Rollout:
        """Sample ``num_generations`` completions per prompt with their sampling log-probs."""
        from vllm import SamplingParams

        self._check_alive()
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        check_prompt_lengths(prompt_ids, self.max_model_len)
        self._wake_weights()
        if self._weights_lost:
            raise RuntimeError("the engine's weights were dropped by a level-2 sleep: call sync_weights(model) first")
        self._wake_kv()
        params = SamplingParams(
            n=num_generations,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            flat_logprobs=True,
            stop_token_ids=self.eos_token_ids,
            detokenize=False,
            seed=seed,
        )
        t0 = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False,
            lora_request=self._lora_request,
        )
        elapsed = time.perf_counter() - t0
        rows, completions, logprobs, reasons = [], [], [], []
        for prompt, out in zip(prompt_ids, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                rows.append(prompt)
                completions.append(ids)
                logprobs.append(sampled_logprobs(c.logprobs, ids))
                reasons.append("stop" if c.finish_reason == "stop" else "length")
        prompt_t, prompt_mask = left_pad(rows, self.pad_token_id)
        completion_t, completion_mask = right_pad(completions, self.pad_token_id)
        lp = torch.zeros(completion_t.shape, dtype=torch.float32)
        for i, row in enumerate(logprobs):
            lp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return Rollout(
            prompt_ids=prompt_t,
            prompt_mask=prompt_mask,
            completion_ids=completion_t,
            completion_mask=completion_mask,
            sampling_logprobs=lp,
            finish_reasons=reasons,
            group_index=torch.arange(len(prompt_ids)).repeat_interleave(num_generations),
            extras={"engine": "vllm", "generate_time": elapsed},
        )

    # ----------------------------------------------------------------------------- lifecycle
    def _check_alive(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine was shut down; create a new one")

    def shutdown(self) -> None:
        """Stop the engine and give its GPU memory back (idempotent)."""
        shared = getattr(self, "shared", None)
        if shared is not None:
            shared.unshare()  # the trainer gets private copies before the engine's memory goes
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):  # freeing unmapped (sleeping) memory makes vLLM's allocator complain
                self._wake_weights()
                self._wake_kv()
        self.llm = None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            self._lora_model = None
            gc.collect()
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                if not self._dist_was_initialized:
                    destroy_distributed_environment()
            gc.collect()
            torch.cuda.empty_cache()
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()


__all__ = [
    "EXECUTION_MODES",
    "LORA_SYNC_MODES",
    "UnsupportedArchitectureError",
    "VLLMEngine",
    "adapter_sync_unsupported_reason",
    "check_architecture",
    "check_prompt_lengths",
    "execution_kwargs",
    "kv_cache_bytes_for",
    "merged_lora_weights",
    "require_cuda",
    "require_vllm",
    "sampled_logprobs",
]
