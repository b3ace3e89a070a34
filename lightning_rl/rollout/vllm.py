"""Colocated vLLM rollout engine: an in-process ``vllm.LLM`` on the policy's GPU, fed the policy's weights.

The engine is built from the policy's *config* only (``load_format="dummy"``) and then receives
the weights from the live policy, so a model that exists only in memory (loaded from GGUF, just
modified, or being trained) works. Sleep mode lets it hand its memory (weights and KV cache) back
to training between rollouts; :class:`~lightning_rl.rollout.sleep_state.SleepState` says where it is.

Under Lightning's DDP or FSDP (``torch.distributed`` initialised, one process per GPU) every process runs its
own engine on its own GPU in vLLM's external-launcher mode, generating for its own prompts; with
``tensor_parallel_size = T`` groups of ``T`` consecutive processes share one sharded engine and generate the
group's prompts together (:mod:`~lightning_rl.rollout.engine_ranks`, :mod:`~lightning_rl.rollout.tensor_parallel`).
Weights of a policy sharded by FSDP are gathered one unit or tensor at a time on their way in.

LoRA policies sync only their adapter tensors (in memory, no merge, no disk) into vLLM's LoRA
manager; when vLLM cannot take the adapter (DoRA, ``modules_to_save``, biases, rank patterns),
the merged weights ``W + B A * scale`` are pushed instead.

The pieces: :mod:`~lightning_rl.rollout.vllm_settings` (the arguments), :mod:`~lightning_rl.rollout.vllm_sizing`
(torch-only sizing), :mod:`~lightning_rl.rollout.vllm_internals` (all that reaches into vLLM's private parts,
version-gated), :mod:`~lightning_rl.rollout.vllm_checks` (early, clear errors),
:mod:`~lightning_rl.rollout.vllm_outputs` (completions to a ``Rollout``) and this engine.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_rl.models import unwrap
from lightning_rl.rollout.engine import Rollout, SamplingConfig
from lightning_rl.rollout.engine_ranks import EngineRanks, new_tp_group
from lightning_rl.rollout.engine_steps import step_clock
from lightning_rl.rollout.policy_weights import (
    adapter_tensors,
    base_weights,
    full_weights,
    merged_lora_weights,
    vllm_lora_rank,
)
from lightning_rl.rollout.sharded_weights import is_sharded
from lightning_rl.rollout.shared_weights import (
    ParkedBase,
    SharedBaseWeights,
    park_base_on_host,
    share_base_with_engine,
)
from lightning_rl.rollout.sleep_state import Memory, SleepState
from lightning_rl.rollout.tensor_parallel import gather_group_prompts, own_rows, take_rows
from lightning_rl.rollout.vllm_checks import check_architecture, check_eos_ids, check_prompt_lengths, require_cuda
from lightning_rl.rollout.vllm_internals import VLLMInternals, fp32_head, require_supported_vllm, require_vllm
from lightning_rl.rollout.vllm_outputs import rollout_from_outputs
from lightning_rl.rollout.vllm_settings import EngineSettings
from lightning_rl.rollout.vllm_sizing import (
    engine_sleep_level,
    engine_weight_bytes,
    engine_weight_dtype,
    execution_kwargs,
    lora_sync_mode,
)

log = logging.getLogger(__name__)


class VLLMEngine:
    """A vLLM engine in this process, on this GPU, generating with the policy's current weights.

    Args:
        model: the policy (a transformers causal LM, or a peft LoRA wrapper of one).
        eos_token_ids: ids that end a completion.
        pad_token_id: id used to pad prompts and completions in the returned :class:`Rollout`.
        max_model_len: longest prompt + completion in tokens.
        max_num_seqs: sequences this process's rollout has at once (its ``prompts * G``); a tensor-parallel
            engine runs ``tensor_parallel_size`` times as many (the group's).
        settings: dtype, LoRA sync, sleep level, execution mode, KV-cache size, tensor parallelism, ... (see
            :class:`~lightning_rl.rollout.vllm_settings.EngineSettings`); ``kv_cache_bytes=None`` sizes vLLM by
            ``gpu_memory_utilization`` (0.3 when that is None too).
        weights_root: the module the training strategy wrapped (Lightning's ``trainer.strategy.model``): under
            FSDP its units hold the policy's shards, gathered from there at every sync. None: ``model``.

    Raises:
        ValueError: a ``tensor_parallel_size`` these processes cannot form (see
            :func:`~lightning_rl.rollout.engine_ranks.check_tensor_parallel`), or settings that contradict each
            other or the policy.
    """

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        settings: EngineSettings | None = None,
        weights_root: nn.Module | None = None,
    ) -> None:
        settings = settings or EngineSettings()
        ranks = EngineRanks.current(settings.tensor_parallel_size)
        require_vllm()
        require_cuda()
        check_eos_ids(eos_token_ids, "VLLMEngine")
        lora_mode, reason = lora_sync_mode(model, settings.lora_sync)
        if settings.lora_sync == "adapter" and reason:
            raise ValueError(f"lora_sync='adapter' is impossible for this adapter: {reason}; use 'merged'")
        if reason and settings.lora_sync == "auto":
            log.warning("vLLM cannot take this LoRA adapter as tensors (%s): pushing merged weights", reason)
        if settings.share_base_weights and lora_mode != "adapter":
            raise ValueError("share_base_weights=True needs a LoRA policy synced as an adapter (lora_sync='adapter' "
                             f"or 'auto'); this engine would push {lora_mode or 'full'} weights")
        sharded = is_sharded(model, weights_root)
        unshareable = _unshareable_reason(ranks, sharded)
        if settings.share_base_weights and unshareable:
            raise ValueError(f"share_base_weights=True is impossible: {unshareable}; use share_base_weights=None")
        if sharded and lora_mode == "merged":
            raise ValueError("an FSDP-sharded LoRA policy syncs its adapter only, and vLLM cannot take this one as "
                             f"an adapter ({reason or 'lora_sync=merged'}): use lora_sync='adapter' with a plain "
                             "LoRA adapter, or strategy='ddp'")
        require_supported_vllm()
        adapter = lora_mode == "adapter"
        weight_dtype = engine_weight_dtype(model, settings.dtype, adapter=adapter)
        weight_bytes = engine_weight_bytes(model, settings.dtype, adapter=adapter,
                                           tensor_parallel_size=ranks.tensor_parallel_size, root=weights_root)
        self._bind(VLLMInternals(None), eos_token_ids, pad_token_id, max_model_len, settings, lora_mode,
                   engine_sleep_level(lora_mode, weight_bytes, settings), weight_dtype, ranks=ranks)
        self.weight_bytes = weight_bytes
        self.weights_root = weights_root
        self._dir = tempfile.mkdtemp(prefix="lightning-rl-vllm-")
        share = adapter and settings.share_base_weights is not False and not unshareable
        parked, park_reason = park_base_on_host(model, weight_dtype) if share else (ParkedBase(), None)
        if park_reason and settings.share_base_weights:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise ValueError(f"share_base_weights=True, but the base weights cannot be shared: {park_reason}")
        try:
            kwargs = self._llm_kwargs(model, max_num_seqs * ranks.tensor_parallel_size)
            self.tp_group = new_tp_group(ranks)  # collective: every process, before vLLM makes its own groups
            t0 = time.perf_counter()
            launcher_env = ranks.launcher_env() if ranks.external_launcher else None
            self.internals = VLLMInternals.start(kwargs, launcher_env)
        except Exception:
            parked.restore()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.startup_time = time.perf_counter() - t0
        self.llm = self.internals.llm
        self.engine_kwargs = kwargs
        try:
            self.sync_weights(model)  # a parked base loads from host memory
        except Exception:
            parked.restore()
            raise
        if share:
            self._share_base(model, bool(settings.share_base_weights), parked, park_reason)

    @classmethod
    def from_llm(
        cls,
        llm: Any,
        internals: VLLMInternals,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_model_len: int,
        settings: EngineSettings | None = None,
        lora_mode: str | None = None,
        sleep_level: int = 0,
        weight_dtype: torch.dtype = torch.bfloat16,
        state: SleepState | None = None,
        ranks: EngineRanks | None = None,
        tp_group: Any = None,
    ) -> VLLMEngine:
        """An engine around an ``llm`` that already runs (or a stand-in for tests): no vLLM import, no GPU.

        Args:
            llm: the ``vllm.LLM`` (``generate``, ``sleep``, ``wake_up``, ``reset_prefix_cache``).
            internals: its private parts (weights, adapters, KV-cache memory).
            eos_token_ids: ids that end a completion.
            pad_token_id: padding id of the returned rollouts.
            max_model_len: longest prompt + completion.
            settings: the engine's settings (``lora_sync`` decides the fallback when an adapter fails).
            lora_mode: None (full weights), ``"adapter"`` or ``"merged"``.
            sleep_level: the level :meth:`sleep` uses.
            weight_dtype: the engine's weight dtype (adapter tensors are cast to it).
            state: where its memory is and whether it holds the policy's weights (default: awake, not synced).
            ranks: its place among the processes (default: a lone process).
            tp_group: the process group of its tensor-parallel group (None: it generates alone).
        """
        engine = cls.__new__(cls)
        engine._bind(internals, eos_token_ids, pad_token_id, max_model_len, settings or EngineSettings(), lora_mode,
                     sleep_level, weight_dtype, state, ranks)
        engine.llm = llm
        engine.tp_group = tp_group
        return engine

    def _bind(
        self, internals: VLLMInternals, eos_token_ids: Sequence[int], pad_token_id: int, max_model_len: int,
        settings: EngineSettings, lora_mode: str | None, sleep_level: int, weight_dtype: torch.dtype,
        state: SleepState | None = None, ranks: EngineRanks | None = None,
    ) -> None:
        """Set every attribute of an engine (the one list of them)."""
        self.internals = internals
        self.llm: Any = internals.llm
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_model_len = int(max_model_len)
        self.settings = settings
        self.lora_sync = settings.lora_sync
        self.lora_mode = lora_mode
        self.sleep_level = sleep_level
        self.weight_dtype = weight_dtype
        self.weight_bytes = 0
        self.execution = settings.execution
        self.state = state or SleepState()
        self.shared = SharedBaseWeights()
        self.shared_freed_bytes = 0
        self.shared_released_bytes = 0
        self.startup_time = 0.0
        self.engine_kwargs: dict[str, Any] = {}
        self.ranks = ranks or EngineRanks()
        self.tp_group: Any = None
        self.weights_root: nn.Module | None = None
        self._lora_request: Any = None
        self._dir = ""

    def _llm_kwargs(self, model: nn.Module, max_num_seqs: int) -> dict[str, Any]:
        """``vllm.LLM`` arguments: the policy's config saved to ``self._dir``, dummy weights, the settings."""
        from vllm.model_executor.models import ModelRegistry

        s = self.settings
        base = unwrap(model)
        config = copy.deepcopy(base.config)
        arch = (getattr(config, "architectures", None) or [type(base).__name__])[0]
        check_architecture(arch, ModelRegistry.get_supported_archs(), s.engine_kwargs.get("model_impl"))
        config.architectures = [arch]
        quant = getattr(config, "quantization_config", None)
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if quant is not None and str(method).lower().endswith("gguf"):
            del config.quantization_config  # a GGUF file de-quantized on load: the weights in memory are plain
        if s.fp32_logits and self.weight_dtype != torch.float32:
            fp32_head(config)
        config.save_pretrained(self._dir)
        kwargs: dict[str, Any] = dict(
            model=self._dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",
            dtype=str(self.weight_dtype).removeprefix("torch."),
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=True,
            **execution_kwargs(s.execution),
            enable_prefix_caching=s.enable_prefix_caching,
            logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
            seed=s.seed,
            **self.ranks.llm_kwargs(),
        )
        if s.kv_cache_bytes is not None:
            free, total = torch.cuda.mem_get_info()
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_bytes)
            # vLLM still checks that this fraction of the GPU is free when its worker starts (it sizes nothing by
            # it here); half of what is free now leaves room for processes that start on the GPU meanwhile
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization or max(0.01, min(0.9, 0.5 * free / total))
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization or 0.3
        if self.lora_mode == "adapter":
            r = model.peft_config[model.active_adapter].r
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(r))
        kwargs.update(s.engine_kwargs)
        return kwargs

    def _share_base(self, model: nn.Module, required: bool, parked: ParkedBase, park_reason: str | None) -> None:
        """Point the parked base parameters at the engine's weights, or move them back to the GPU.

        ``park_reason``: why nothing was parked (sharing is impossible); then only that is logged.
        """
        shared, reason = ((SharedBaseWeights(), park_reason) if park_reason
                          else share_base_with_engine(model, self.internals.model()))
        if reason:
            parked.restore()
            if required:
                self.shutdown()
                raise ValueError(f"share_base_weights=True, but the base weights cannot be shared: {reason}")
            log.info("LoRA base weights not shared with the vLLM engine (%s): the GPU holds two copies", reason)
            return
        self.shared = shared
        self.shared_freed_bytes = parked.freed_bytes  # the trainer's copy, gone before the engine started
        self.shared_released_bytes = parked.released_bytes
        if parked.released_bytes < 0.9 * parked.freed_bytes:
            log.warning("LoRA base weights shared with the vLLM engine, but PyTorch's allocator kept %.0f of the %.0f "
                        "MiB the trainer's copy freed (other tensors share its memory blocks): the GPU holds that "
                        "much more than the memory plan counts", (parked.freed_bytes - parked.released_bytes) / 2**20,
                        parked.freed_bytes / 2**20)
        log.info("LoRA base weights shared with the vLLM engine: %.1f MiB held once", shared.bytes_shared / 2**20)

    def _runner(self) -> Any:
        """The model runner in this process (:attr:`VLLMInternals.runner`)."""
        return self.internals.runner

    def _install_adapter(self, model: nn.Module, root: nn.Module | None) -> None:
        tensors, config = adapter_tensors(model, root)
        tensors = {k: v.to(self.weight_dtype) for k, v in tensors.items()}  # fp32 masters -> the engine's 16 bits
        self._lora_request = self.internals.install_adapter(tensors, config)

    # ----------------------------------------------------------------------------- RolloutEngine
    @property
    def needs_sync(self) -> bool:
        """True when the engine holds no valid weights (after a level-2 sleep) until the next sync."""
        return not self.state.weights_synced

    @property
    def is_sleeping(self) -> bool:
        """Whether the engine's memory is released."""
        return self.state.is_sleeping

    def sync_weights(self, model: nn.Module, root: nn.Module | None = None) -> None:
        """Push ``model``'s current weights (or only its LoRA adapter) into the engine.

        Under FSDP every process must call it at the same point: the shards are gathered collectively, one unit
        or tensor at a time, from ``root`` (default: the engine's ``weights_root``). A tensor-parallel engine takes
        full tensors on every process and keeps its shard of them.
        """
        self._check_alive()
        root = root if root is not None else self.weights_root
        if self.shared.views and self.lora_mode != "adapter":
            self.shared.unshare()  # pushing full or merged weights would overwrite the trainer's base
        self._wake_weights()
        if self.lora_mode == "adapter":
            if not self.state.weights_synced:
                self.internals.load_weights(base_weights(model, root))
            try:
                self._install_adapter(model, root)
            except Exception as err:
                if self.lora_sync != "auto":
                    raise
                log.warning("adapter-only LoRA sync failed (%s); pushing merged weights from now on", err)
                self.lora_mode, self._lora_request = "merged", None
                self.shared.unshare()
                self.internals.load_weights(merged_lora_weights(model, root))
        elif self.lora_mode == "merged":
            self._lora_request = None  # generate with the merged weights, no adapter on top
            self.internals.load_weights(merged_lora_weights(model, root))
        else:
            self.internals.load_weights(full_weights(model, root))
        self.state.weights_synced = True
        if self.state.memory is Memory.AWAKE:
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def _wake_weights(self) -> None:
        if self.state.memory is Memory.ASLEEP:
            self.llm.wake_up(tags=["weights"])
            self.state.memory = Memory.WEIGHTS_AWAKE

    def _wake_kv(self) -> None:
        if self.state.memory is Memory.WEIGHTS_AWAKE:
            self.llm.wake_up(tags=["kv_cache"])
            self.state.memory = Memory.AWAKE
        elif self.state.memory is Memory.KV_RELEASED:
            self.internals.restore_kv_cache()
            self.state.memory = Memory.AWAKE
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
            if self.state.memory is Memory.AWAKE:
                self.internals.release_kv_cache()  # CuMem memory goes straight back to the driver
                self.state.memory = Memory.KV_RELEASED
            return
        if self.state.memory is Memory.ASLEEP:
            return
        self._wake_kv()
        self.llm.sleep(level=level)  # vLLM's allocator runs gc.collect() and empty_cache() itself
        self.state.memory = Memory.ASLEEP
        if level == 2:
            self.state.weights_synced = False

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, num_generations: int = 1,
        seed: int | None = None,
    ) -> Rollout:
        """Sample ``num_generations`` completions per prompt with their sampling log-probs.

        A tensor-parallel engine generates its group's prompts (every member must call it at the same point, with
        the same sampling and seed) and returns the rows of this process's own prompts.
        """
        from vllm import SamplingParams

        self._check_alive()
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        check_prompt_lengths(prompt_ids, self.max_model_len)
        counts = None
        if self.tp_group is not None:
            prompt_ids, counts = gather_group_prompts(prompt_ids, self.tp_group)
        self._wake_weights()
        if not self.state.weights_synced:
            raise RuntimeError("the engine holds no policy weights (a level-2 sleep dropped them): "
                               "call sync_weights(model) first")
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
        outputs, steps = step_clock(self.llm).run(lambda: self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False,
            lora_request=self._lora_request,
        ))
        extras = {"engine": "vllm", "generate_time": time.perf_counter() - t0,
                  **(steps.as_extras() if steps is not None else {})}
        rollout = rollout_from_outputs(prompt_ids, outputs, num_generations, self.pad_token_id, extras)
        if counts is None:
            return rollout
        return take_rows(rollout, own_rows(counts, self.ranks.rank_in_group, num_generations))

    # ----------------------------------------------------------------------------- lifecycle
    def _check_alive(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine was shut down; create a new one")

    def shutdown(self) -> None:
        """Stop the engine and give its GPU memory back (idempotent)."""
        shared = getattr(self, "shared", None)
        if shared is not None:
            shared.unshare()  # the trainer gets private copies before the engine's memory goes
        if getattr(self, "llm", None) is not None:
            with contextlib.suppress(Exception):  # freeing unmapped (sleeping) memory makes vLLM's allocator complain
                self._wake_weights()
                self._wake_kv()
        self.llm = None
        internals = getattr(self, "internals", None)
        if internals is not None:
            internals.shutdown()
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()


def _unshareable_reason(ranks: EngineRanks, sharded: bool) -> str | None:
    """Why the trainer's base weights cannot point at the engine's (None when they can)."""
    if ranks.tensor_parallel_size > 1:
        return f"the engine holds 1/{ranks.tensor_parallel_size} of each weight (tensor_parallel_size > 1)"
    if sharded:
        return "the trainer's weights are sharded by FSDP"
    return None


__all__ = ["VLLMEngine"]
