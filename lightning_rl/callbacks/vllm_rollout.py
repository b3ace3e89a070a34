"""The callback that toggles the policy into a colocated vLLM engine before each training step."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_rl.callbacks.merged_base_choice import check_merged_base_module, merged_base_refusal
from lightning_rl.callbacks.rollout_ahead import RolloutAhead, next_batch_prompts
from lightning_rl.callbacks.trained_weights_choice import trained_weights_refusal
from lightning_rl.gpu_yield import GPUYield, gpu_yield_for
from lightning_rl.lora import is_lora
from lightning_rl.modules.resume_state import training_rng_kept
from lightning_rl.modules.sequence_limits import encode_within_positions
from lightning_rl.plugins.allocator import disable_expandable_segments, enable_expandable_segments
from lightning_rl.plugins.device_context import process_tree_used_bytes
from lightning_rl.plugins.device_memory import device_used_bytes
from lightning_rl.plugins.dtypes import trainer_compute_dtype
from lightning_rl.plugins.host_masters import HostMasterWeights
from lightning_rl.plugins.memory_plan import (
    KV_BLOCK_TOKENS,
    GiB,
    kv_bytes_per_token,
    planned_engine_bytes,
    rollout_kv_tokens,
)
from lightning_rl.plugins.precision import MemoryAwarePrecision
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.rollout.cuda_mps import active_private_mps, leave_private_mps, start_private_mps
from lightning_rl.rollout.data_prompts import longest_prompt_tokens
from lightning_rl.rollout.engine import RolloutEngine
from lightning_rl.rollout.engine_steps import engine_step_timings
from lightning_rl.rollout.sharded_weights import is_sharded
from lightning_rl.rollout.vllm_settings import EngineSettings
from lightning_rl.rollout.vllm_sizing import (
    engine_weight_bytes,
    engine_weight_dtype,
    kv_cache_bytes_for,
    kv_cache_dtype,
    lora_sync_mode,
    merged_base_bytes,
    sequences_at_once,
    shared_base_bytes,
    weights_kept_asleep_bytes,
)
from lightning_rl.shapes import TrainingShape, datamodule_batch_size

log = logging.getLogger(__name__)

#: Device memory of the engine's own process beyond its weights and KV cache (CUDA context, CUDA graphs, sampler
#: workspace), for the memory plan when the engine runs beside training.
ENGINE_PROCESS_OVERHEAD_BYTES = 1 << 30

#: Seed offset between engines: each process's engine (each tensor-parallel group's, whose members must sample
#: alike) samples its own prompts from its own stream.
RANK_SEED_STRIDE = 1_000_003

EngineFactory = Callable[[L.LightningModule, int, int], RolloutEngine]
_MODULE_NEEDS = ("generate_rollout", "policy", "sampling", "num_generations", "training_shape")


def _engine_start_measure(
    device: torch.device | str,
) -> tuple[Callable[[torch.device | str], int | None], int | None]:
    """How the engine's start is measured, and the figure before it.

    This process and its descendants on the device (NVML), so that other jobs on the GPU do not move it; the
    whole device's use where NVML cannot list processes.

    Returns:
        The function to take the figure after the start with, and the figure now (None off CUDA).
    """
    if torch.device(device).type == "cuda":
        own = process_tree_used_bytes(torch.device(device))
        if own is not None:
            return (lambda dev: process_tree_used_bytes(torch.device(dev))), own
    return device_used_bytes, device_used_bytes(device)


def _upcoming_job(pl_module: L.LightningModule, engine: RolloutEngine, prompts: list[Any]) -> Callable[[], Any]:
    """The job that generates the next batch's rollout, its prompts encoded and checked here (in this thread).

    A prompt the module refuses (too long for ``max_prompt_length`` or for the model's positions) fails in the job,
    so that the error surfaces when its own batch takes the rollout, after this batch trained and checkpointed.
    """
    sampling, g = pl_module.sampling, pl_module.num_generations
    try:
        ids = encode_within_positions(pl_module, prompts, sampling.max_new_tokens)
    except Exception as err:  # noqa: BLE001 - raised again by the job, at the batch the prompts belong to
        failure = err

        def refuse() -> Any:
            raise failure

        return refuse
    return lambda: engine.generate(ids, sampling, g)


def _restores_after_fit_start(trainer: Any) -> bool:
    """Whether the trainer's strategy restores a checkpoint after ``on_fit_start`` (FSDP, DeepSpeed, ModelParallel:
    ``restore_checkpoint_after_setup``): a resumed fit's callback states are not yet loaded there.
    """
    return bool(getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", False))


def _strategy_model(trainer: Any) -> nn.Module | None:
    """The module the trainer's strategy wrapped (under FSDP its units hold the policy's shards), if any."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, nn.Module) else None


def start_mps_for(wanted: bool | None, settings: EngineSettings, engine_factory: EngineFactory | None,
                  overlap: bool | None) -> str | None:
    """Start the private MPS daemon for ``VLLMRollout(mps=wanted)`` where it can serve; None, or why it did not.

    Raises:
        ValueError: ``wanted`` is True and the daemon cannot serve this process.
    """
    if wanted is False:
        return "mps=False"
    if overlap is False:
        reason = "overlap=False: the engine runs in this process"
    elif engine_factory is not None:
        reason = "a custom engine_factory"
    elif settings.tensor_parallel_size > 1:
        reason = "a tensor-parallel engine"
    else:
        reason = start_private_mps()[1]
    if reason and wanted:
        raise ValueError(f"VLLMRollout(mps=True) is impossible here: {reason}. Use mps=None (MPS where it can "
                         "serve) or False.")
    if reason:
        log.debug("VLLMRollout: no CUDA MPS (%s)", reason)
    return reason


class VLLMRollout(Callback):
    """Generate each training batch's rollout with a vLLM engine that shares the GPU with training.

    The engine is created once at ``on_fit_start`` (or at the first batch when the number of
    prompts per step is not known yet, or under a strategy that restores checkpoints after ``on_fit_start``, such
    as FSDP or DeepSpeed: a resumed engine's seed counts the restored step), sized from the module's
    :class:`~lightning_rl.shapes.TrainingShape`: ``G x prompts`` sequences of ``max_prompt_tokens +
    max_new_tokens`` tokens. Before every training batch it wakes the engine, pushes the policy's
    weights if an optimizer step happened since the last push (``trainer.global_step``), generates
    with the module's ``generate_rollout(..., engine=...)``, puts the engine to sleep and attaches
    the :class:`~lightning_rl.rollout.Rollout` to the batch under ``"rollout"``, where
    :class:`~lightning_rl.modules.GRPO` picks it up.

    With :class:`~lightning_rl.plugins.MemoryAwarePrecision` the callback registers itself at ``setup``
    (:meth:`~lightning_rl.plugins.MemoryAwarePrecision.register_rollout`): the plan asks it what the engine
    needs (:meth:`rollout_memory`), the engine gets the plan's KV-cache budget, and the plugin moves optimizer
    states out of the way while the engine is awake.

    With ``overlap`` the engine runs in a process of its own
    (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`) and generates the next batch's rollout while
    the current batch trains: a step takes about the longer of the two instead of their sum. That rollout is one
    optimizer step old when it trains; the module's truncated importance weights (engine log-probs against the
    trainer's) correct for it, and ``rollout/staleness`` logs it. The engine then keeps its memory during the
    update (the memory plan counts it in the train phase), and the trainer's CUDA allocator switches to
    expandable segments (:mod:`~lightning_rl.plugins.allocator`; vLLM's sleep mode, which an engine in this
    process needs, does not allow them), unless ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) names
    ``expandable_segments``.

    Under Lightning's DDP or FSDP each process builds its own engine on its own GPU (vLLM's external-launcher
    mode); ``settings.tensor_parallel_size`` shards one engine over groups of consecutive processes. Under FSDP
    the weights are gathered from the strategy's shards one unit (FSDP1) or tensor (FSDP2) at a time.

    Args:
        prompts_per_step: prompts in a training batch; None reads ``trainer.datamodule.batch_size``
            or waits for the first batch.
        max_model_len: prompt + completion limit of the engine; None uses the module's
            ``max_prompt_tokens + max_new_tokens``.
        settings: the engine's dtype, LoRA sync, sleep level, execution mode, KV-cache sizing, seed, ...
            (:class:`~lightning_rl.rollout.vllm_settings.EngineSettings`; the seed is offset by the last synced
            step on resume so runs do not replay, and by the process's rank under DDP/FSDP so the processes'
            engines draw different samples; with ``tensor_parallel_size = T`` by the rank's group ``rank // T``,
            the same for the ``T`` shards of one engine).
        engine_factory: ``(module, prompts_per_step, seed) -> RolloutEngine`` to build another engine
            (tests use a fake one); None builds a :class:`~lightning_rl.rollout.vllm.VLLMEngine` (or with
            ``overlap`` a :class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`).
        overlap: generate the next batch's rollout during the current update. None (automatic): on when the
            engine can run in its own process (one training process on CUDA device 0; a full fine-tune or plain
            LoRA on linear layers, which that engine merges as it loads; see
            :func:`~lightning_rl.rollout.vllm_process.process_engine_unsupported_reason`), else off. Off also with
            ``settings.share_base_weights=True`` or ``settings.lora_sync="adapter"``, which ask for an engine in
            this process. True raises when it cannot. With ``engine_factory`` only True turns it on (the factory's
            engine must be safe to use from a background thread while the policy trains). Between updates always
            for a module without importance weights (PPO) or with ``importance_sampling="none"``, and for one that
            overrides ``generate_rollout`` (the rollout made ahead calls ``encode`` and the engine's ``generate``).
        yield_gpu: with the engine in its own process generating beside the update, the update waits for its own
            kernels after every decoder layer while the engine generates (:class:`~lightning_rl.gpu_yield.GPUYield`),
            so that the engine's decode steps do not wait for the update's time slices on the GPU. None (the
            default): on where that applies (an engine process overlapping the update on CUDA, a policy with
            decoder layers), off elsewhere. True: the same, and a policy without decoder layers raises. False: off.
        mps: run this process and its engine process as clients of a private CUDA MPS daemon
            (:mod:`~lightning_rl.rollout.cuda_mps`), so that the GPU runs their kernels at the same time instead of
            time-slicing between them. Started here, in the constructor: CUDA connects to MPS when it starts in a
            process, so construct the callback before anything uses the GPU (as in ``Trainer(callbacks=[...])``).
            This process joins at below-normal priority and its engine process at normal priority, unless
            ``CUDA_MPS_CLIENT_PRIORITY`` is set already. False (the default: on an H100 it passed its GPU test but
            gave no gain; docs/gpu_settings.md): never. None: started where it can be (Linux, one training process,
            the driver's ``nvidia-cuda-mps-control``, CUDA not started yet, no ``CUDA_MPS_PIPE_DIRECTORY`` of your
            own, an engine that may run in its own process); otherwise, or when this process did not become a client
            by the time the engine starts, the run goes on without it (logged). True: the same, and what prevents it
            raises.
    """

    def __init__(
        self,
        prompts_per_step: int | None = None,
        max_model_len: int | None = None,
        settings: EngineSettings | None = None,
        engine_factory: EngineFactory | None = None,
        overlap: bool | None = None,
        yield_gpu: bool | None = None,
        mps: bool | None = False,
    ) -> None:
        super().__init__()
        if prompts_per_step is not None and prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.prompts_per_step = prompts_per_step
        self.max_model_len = max_model_len
        self.settings = settings or EngineSettings()
        self.mps = mps
        self.mps_off_reason = start_mps_for(mps, self.settings, engine_factory, overlap)
        self.using_mps = False  # decided when the engine is built (_create)
        self.engine_factory = engine_factory
        self.overlap = overlap
        self.yield_gpu = yield_gpu
        self.gpu_yield: GPUYield | None = None  # installed on the policy when the engine process overlaps (_create)
        self.overlapping = False  # decided when the engine is built
        self._overlap_released = False  # the memory plan did not fit with the engine beside the update
        self._ahead = RolloutAhead()
        self.engine: RolloutEngine | None = None
        self.last_synced_step: int | None = None
        self.num_syncs = 0
        self.num_rollouts = 0
        self.last_timings: dict[str, float] = {}
        self.engine_start_bytes: int | None = None  # device memory the engine's start added (CUDA; see _create)
        self.expandable_segments = False  # this callback turned on expandable segments (beside an engine process)
        self.sharing_merged_base = False  # the policy's LoRA base is the engine process's merged weights (_create)
        self.sharing_trained_weights = False  # the policy's 16-bit weights are the engine process's own (_create)
        self._restored_step = 0
        self._trainer: L.Trainer | None = None
        self._data_prompt_tokens: int | None = None  # kv_prompt_tokens="data": the data's longest prompt
        self._plugin: MemoryAwarePrecision | None = None

    # ----------------------------------------------------------------------------- sizing
    def engine_dtype(self, policy: nn.Module, trainer: Any = None) -> torch.dtype:
        """The engine's weight and KV-cache dtype: ``settings.dtype``, or for ``"auto"`` the trainer's compute dtype.

        Under mixed precision (fp32 master weights, bf16 autocast) the engine runs in bf16: half the
        memory of an fp32 engine, and vLLM's LoRA kernels need 16 bits. See
        :func:`~lightning_rl.rollout.vllm_sizing.engine_weight_dtype`.
        """
        lora_mode, _ = lora_sync_mode(policy, self.settings.lora_sync)
        return engine_weight_dtype(policy, self.settings.dtype, trainer_compute_dtype(trainer),
                                   adapter=lora_mode == "adapter")

    def weights_kept_asleep_bytes(self, policy: nn.Module, trainer: Any = None) -> int:
        """Bytes of the engine's weights that stay on the GPU while it sleeps (full or merged pushes, level 0)."""
        dtype = trainer_compute_dtype(trainer)
        return weights_kept_asleep_bytes(policy, self.settings, dtype, _strategy_model(trainer))

    def max_len(self, shape: TrainingShape) -> int:
        """The engine's prompt + completion limit: ``max_model_len``, or the module's longest sequence."""
        return self.max_model_len or shape.max_prompt_tokens + shape.max_new_tokens

    def prompt_tokens(self, shape: TrainingShape) -> int:
        """The prompt length the KV cache is sized for (``EngineSettings.kv_prompt_tokens``)."""
        limit = self.max_len(shape) - shape.max_new_tokens
        if self.settings.kv_prompt_tokens != "data":
            return limit
        if self._data_prompt_tokens is not None:  # measured for this fit (kept after it, for a look at the plan)
            return min(limit, self._data_prompt_tokens)
        if self._trainer is None:
            return limit
        module = self._trainer.lightning_module
        encode = getattr(module, "encode", None)
        longest = None if encode is None else longest_prompt_tokens(self._trainer.datamodule, encode)
        self._data_prompt_tokens = limit if longest is None else min(limit, longest)
        log.info("VLLMRollout: the KV cache is sized for prompts of %d tokens (%s)", self._data_prompt_tokens,
                 "the limit: the DataModule keeps no rows to measure" if longest is None
                 else f"the data's longest; the limit is {limit}")
        return self._data_prompt_tokens

    def kv_tokens(self, shape: TrainingShape, prompts_per_step: int) -> int:
        """KV-cache tokens of one rollout (without headroom), as the engine and the memory plan count them."""
        return rollout_kv_tokens(prompts_per_step, shape.num_generations, self.prompt_tokens(shape),
                                 shape.max_new_tokens, self.settings.enable_prefix_caching)

    def kv_bytes_per_token(self, shape: TrainingShape, dtype: torch.dtype) -> int:
        """KV-cache bytes per token of this shard's KV heads, in the cache's dtype, for an engine of ``dtype``."""
        s = self.settings
        return kv_bytes_per_token(shape.model_config, kv_cache_dtype(s, dtype).itemsize, s.tensor_parallel_size)

    def rollout_memory(self, shape: TrainingShape) -> RolloutMemory:
        """What the engine takes from the device, for the memory plan (the plugin calls it at setup)."""
        if self._trainer is None:
            raise RuntimeError("VLLMRollout.rollout_memory is asked during a fit, after the callback's setup")
        trainer, s = self._trainer, self.settings
        policy = trainer.lightning_module.policy
        dtype, tp = self.engine_dtype(policy, trainer), s.tensor_parallel_size
        per_token = self.kv_bytes_per_token(shape, dtype)
        prompts = self.prompts_per_step or datamodule_batch_size(trainer)
        tokens, headroom = (self.kv_tokens(shape, prompts * tp) if prompts else 0), s.kv_cache_headroom  # the group's
        least = self.max_len(shape) + KV_BLOCK_TOKENS if tokens else 0  # one whole sequence: the least for waves
        if s.kv_cache_bytes is not None:
            tokens, headroom, least = math.ceil(s.kv_cache_bytes / per_token), 1.0, 0
        root = _strategy_model(trainer)
        weight_bytes = engine_weight_bytes(policy, dtype, tensor_parallel_size=tp, root=root)
        beside, kept = 0, self.weights_kept_asleep_bytes(policy, trainer)
        frozen = self._plugin.frozen_dtype if self._plugin is not None else None
        module = trainer.lightning_module
        if self.overlap_off_reason(module, trainer) is None:  # the engine stays up during updates
            shares = dataclasses.replace(s, share_merged_base=self.shares_merged_base(module))
            weight_bytes -= merged_base_bytes(policy, shares, dtype, frozen)  # a shared base counts once, as frozen
            masters = self._host_masters()
            if masters is not None and self.shares_trained_weights(module, dtype):  # counted once, as the trainer's
                weight_bytes -= sum(p.numel() for p in masters.parameters()) * dtype.itemsize
            beside = weight_bytes + math.ceil(tokens * headroom) * per_token + ENGINE_PROCESS_OVERHEAD_BYTES
            kept = 0  # counted in ``beside``
        else:  # an in-process engine; a LoRA base it shares with the trainer counts once, as frozen weights
            weight_bytes -= shared_base_bytes(policy, s, dtype, frozen, is_sharded(policy, root))
        return RolloutMemory(engine_weight_bytes=weight_bytes, weights_kept_asleep_bytes=kept,
                             kv_bytes_per_token=per_token, kv_tokens=tokens, headroom=headroom,
                             sized_by_gpu_fraction=s.gpu_memory_utilization is not None,
                             beside_training_bytes=beside, min_kv_tokens=least)

    def overlap_off_reason(self, pl_module: L.LightningModule, trainer: Any = None) -> str | None:
        """Why this callback would generate between updates instead of during them (None: it overlaps)."""
        if self.overlap is False:
            return "overlap=False"
        if self._overlap_released:
            return "the memory plan does not fit with the engine beside the update"
        if getattr(type(pl_module).generate_rollout, "__qualname__", "") != "PolicyModule.generate_rollout":
            return f"{type(pl_module).__name__} overrides generate_rollout"
        level = getattr(pl_module, "importance_sampling", None)
        if level is None:
            return f"{type(pl_module).__name__} has no importance weights to correct a rollout one step old"
        if level == "none":
            return "importance_sampling='none' would leave a rollout one step old uncorrected"
        if self.engine_factory is not None:
            return None if self.overlap else "a custom engine_factory (overlap=True overlaps its rollouts)"
        if self.settings.share_base_weights:
            return "share_base_weights=True shares the LoRA base weights with an engine in this process"
        if self.settings.lora_sync == "adapter" and is_lora(pl_module.policy):
            return "lora_sync='adapter' pushes the adapter into an engine in this process"
        from lightning_rl.rollout.vllm_process import process_engine_unsupported_reason

        return process_engine_unsupported_reason(pl_module.policy, _strategy_model(trainer))

    def shares_merged_base(self, pl_module: L.LightningModule, engine_dtype: torch.dtype | None = None) -> bool:
        """Whether, with the rollouts overlapping, the engine process's merged weights will be the policy's LoRA
        base (``share_merged_base``; the callers know whether they overlap).

        True when asked for (``_create`` raises when impossible); with None (automatic) for an engine process this
        callback builds (no ``engine_factory``) where :func:`~.merged_base_choice.merged_base_refusal` finds
        nothing against it (``engine_dtype``: also the frozen base's dtype).
        """
        wanted = self.settings.share_merged_base
        if wanted is not None:
            return wanted
        return self.engine_factory is None and merged_base_refusal(pl_module, engine_dtype) is None

    def shares_trained_weights(self, pl_module: L.LightningModule, engine_dtype: torch.dtype | None = None) -> bool:
        """Whether, with the rollouts overlapping, the policy's 16-bit trained weights will be the engine process's
        own (``share_trained_weights``; the callers know whether they overlap).

        True when asked for (``_create`` raises when impossible); with None (automatic) for an engine process this
        callback builds where :func:`~.trained_weights_choice.trained_weights_refusal` finds nothing against it.
        """
        wanted = self.settings.share_trained_weights
        if wanted is not None:
            return wanted
        return self.engine_factory is None and trained_weights_refusal(
            pl_module, self._host_masters(), engine_dtype) is None

    def _host_masters(self) -> HostMasterWeights | None:
        return None if self._plugin is None else self._plugin.host_master_weights

    def release_overlap(self) -> bool:
        """Give up automatic overlap (the memory plan asks when it does not fit); True when that changed the plan."""
        if self.overlap is not None or self._overlap_released or self.engine is not None:
            return False
        if self._trainer is None or self.overlap_off_reason(self._trainer.lightning_module, self._trainer):
            return False
        self._overlap_released = True
        return True

    # ----------------------------------------------------------------------------- engine
    def build_engine(self, pl_module: L.LightningModule, prompts_per_step: int) -> RolloutEngine:
        """A :class:`VLLMEngine` sized for ``prompts_per_step * G`` sequences of the module's lengths."""
        from lightning_rl.rollout.vllm import VLLMEngine

        trainer = getattr(pl_module, "_trainer", None)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        group = rank // self.settings.tensor_parallel_size  # the shards of one engine sample alike
        seed = self.settings.seed + self._restored_step + RANK_SEED_STRIDE * group
        if self.engine_factory is not None:
            return self.engine_factory(pl_module, prompts_per_step, seed)
        shape = pl_module.training_shape()
        policy, trainer, s = pl_module.policy, getattr(pl_module, "_trainer", None), self.settings
        dtype = self.engine_dtype(policy, trainer)
        kv = s.kv_cache_bytes
        if kv is None and s.gpu_memory_utilization is None and self._plugin is not None:
            kv = self._plugin.kv_cache_bytes  # the memory plan's KV budget (None without a plan)
        if kv is None and s.gpu_memory_utilization is None:
            new, g = shape.max_new_tokens, shape.num_generations
            kv = kv_cache_bytes_for(shape.model_config, prompts_per_step, g, self.prompt_tokens(shape), new,
                                    kv_cache_dtype(s, dtype),
                                    s.kv_cache_headroom, shared_prompts=s.enable_prefix_caching,
                                    tensor_parallel_size=s.tensor_parallel_size)
        settings = dataclasses.replace(s, dtype=str(dtype).removeprefix("torch."), kv_cache_bytes=kv, seed=seed,
                                       share_merged_base=self.sharing_merged_base,
                                       share_trained_weights=self._trained_weights_setting())
        sequences = prompts_per_step * shape.num_generations
        plan = getattr(self._plugin, "memory_plan", None)
        if kv is not None and s.kv_cache_bytes is None and plan is not None and plan.kv_fraction < 1:
            at_once = sequences_at_once(kv, self.kv_bytes_per_token(shape, dtype), self.max_len(shape), sequences,
                                        s.tensor_parallel_size)
            log.info("VLLMRollout: the memory plan's KV cache holds %d of the rollout's %d sequences at once; the "
                     "engine generates the rest as those finish", at_once, sequences)
            sequences = at_once
        args = (policy, pl_module.eos_token_ids, pl_module.tokenizer.pad_token_id, self.max_len(shape))
        kwargs = dict(max_num_seqs=sequences, settings=settings, weights_root=_strategy_model(trainer))
        if not self.overlapping:
            return VLLMEngine(*args, **kwargs)
        from lightning_rl.rollout.vllm_process import VLLMProcessEngine

        masters = self._host_masters() if self.sharing_trained_weights else None
        return VLLMProcessEngine(*args, **kwargs, host_masters=masters)

    def _trained_weights_setting(self) -> bool | None:
        """``share_trained_weights`` for the engine process: True when asked for, None (share when the weights' layout
        allows, else say why) when chosen automatically, else False.
        """
        if not self.sharing_trained_weights:
            return False
        return True if self.settings.share_trained_weights else None

    def _create(self, trainer: L.Trainer, pl_module: L.LightningModule, prompts_per_step: int) -> None:
        for attr in _MODULE_NEEDS:
            if not hasattr(pl_module, attr):
                raise TypeError(
                    f"VLLMRollout needs a module with `{attr}` (such as lightning_rl.GRPO); "
                    f"{type(pl_module).__name__} has none"
                )
        if getattr(pl_module, "generates_rollouts", True) is False:
            raise ValueError(
                f"VLLMRollout generates the rollouts of modules whose training steps sample completions (GRPO, PPO, "
                f"DPO(online=True)); this {type(pl_module).__name__} samples none, so the engine would generate for "
                "nothing: remove the callback (or train online)"
            )
        reason = self.overlap_off_reason(pl_module, trainer)
        if self.overlap and reason:
            raise ValueError(f"VLLMRollout(overlap=True) is impossible here: {reason}. Use overlap=None (automatic) "
                             "or False to generate between updates.")
        self.overlapping = reason is None
        if self.settings.share_merged_base:
            if self.overlapping:
                check_merged_base_module(pl_module)  # before the start, which would fall back to an in-process engine
            else:
                log.warning("VLLMRollout: share_merged_base=True applies to an engine in its own process; the engine "
                            "runs in this process (%s), where share_base_weights shares a LoRA base", reason)
        dtype = self.engine_dtype(pl_module.policy, trainer)
        self.sharing_merged_base = self.overlapping and self.shares_merged_base(pl_module, dtype)
        if self.settings.share_trained_weights:
            if not self.overlapping:  # ``reason`` says why the engine runs in this process
                log.warning("VLLMRollout: share_trained_weights=True applies to an engine in its own process; the "
                            "engine runs in this process (%s)", reason)
            # refused before the start, which would fall back to an in-process engine
            elif refusal := trained_weights_refusal(pl_module, self._host_masters(), dtype):
                raise ValueError(f"share_trained_weights=True is impossible here: {refusal}; use "
                                 "share_trained_weights=False (or None: shared when possible)")
        self.sharing_trained_weights = self.overlapping and self.shares_trained_weights(pl_module, dtype)
        t0 = time.perf_counter()
        device = getattr(pl_module, "device", "cpu")
        self.using_mps = self._check_mps_client(device)
        measure_used, used_before = _engine_start_measure(device)
        with training_rng_kept():  # vLLM seeds the global random states of a process it starts in
            try:
                self.engine = self.build_engine(pl_module, prompts_per_step)
            except Exception as err:
                if not (self.overlapping and self.overlap is None and self.engine_factory is None):
                    raise
                reason = f"the engine process failed to start: {type(err).__name__}: {err}"
                log.warning("VLLMRollout: %s; generating between updates with an engine in this process instead "
                            "(VLLMRollout(overlap=False) skips the attempt)", reason)
                self.overlapping = self.sharing_merged_base = self.sharing_trained_weights = False
                if self._plugin is not None:  # what the plugin shrank for an engine beside the update comes back
                    self._plugin.engine_leaves_the_update(pl_module)
                self.engine = self.build_engine(pl_module, prompts_per_step)
        used_after = measure_used(device)
        if used_before is not None and used_after is not None:
            self.engine_start_bytes = used_after - used_before
            self._check_engine_memory(self.engine_start_bytes)
        if self.overlapping:
            from lightning_rl.rollout.vllm_process import VLLMProcessEngine

            if isinstance(self.engine, VLLMProcessEngine):  # no sleep mode in this process: segments may grow
                self.expandable_segments = enable_expandable_segments(device)
                if self.yield_gpu is not False and torch.device(device).type == "cuda":
                    self.gpu_yield = gpu_yield_for(pl_module.policy, self._ahead.generating, self.yield_gpu)
        self.last_synced_step = trainer.global_step  # the engine starts with the policy's current weights
        log.info("rollout engine %s ready in %.1f s; rollouts %s", type(self.engine).__name__,
                 time.perf_counter() - t0, "overlap the updates" if self.overlapping else f"between updates ({reason})")

    def _check_mps_client(self, device: Any) -> bool:
        """Whether this process is a client of its private MPS daemon, which its engine process then joins.

        Where it is not (its CUDA started before the daemon, or it has not used CUDA), the daemon quits and the engine
        process starts without it (``mps=True`` raises instead). A daemon that does not answer is kept: quitting it
        under a client would break that client's CUDA context.
        """
        daemon = active_private_mps()
        if daemon is None:
            return False
        client = daemon.is_client(os.getpid())
        if client is False:
            reason = ("this process is not a client of the MPS daemon (its CUDA started before the daemon, or it uses "
                      "no CUDA): construct VLLMRollout before anything uses the GPU")
            if self.mps:
                raise RuntimeError(f"VLLMRollout(mps=True): {reason}; use mps=None to go on without MPS")
            leave_private_mps(reason)
            self.mps_off_reason = reason
            return False
        if client is None:
            log.warning("VLLMRollout: the MPS daemon in %s did not answer whether this process is its client; it "
                        "stays, and the engine process joins it", daemon.root)
        return torch.device(device).type == "cuda"

    def _check_engine_memory(self, started_bytes: int) -> None:
        """Log what the engine's start took; warn when that is more than the memory plan counted for it."""
        plan = None if self._plugin is None else self._plugin.memory_plan
        planned = None if plan is None else planned_engine_bytes(plan)
        log.info("rollout engine start: device memory in use rose by %.2f GiB (the memory plan counted %s)",
                 started_bytes / GiB, "nothing" if planned is None else f"{planned / GiB:.2f} GiB")
        if planned is None or started_bytes <= planned + self._plugin.reserved_bytes:  # within the plan's reserve
            return
        measured_overhead = self._plugin.engine_overhead_bytes + started_bytes - planned
        fix = ("VLLMRollout(overlap=False) runs the engine in this process, without a second CUDA context"
               if self.overlapping else
               f"MemoryAwarePrecision(engine_overhead_bytes={measured_overhead}) counts the engine's workspace as "
               "measured here")
        log.warning("VLLMRollout: the rollout engine took %.2f GiB of device memory at its start; the memory plan "
                    "counted %.2f GiB for it (weights, workspace, KV cache), so the run may go over the plan's "
                    "budget. %s.", started_bytes / GiB, planned / GiB, fix)

    def _needs_sync(self, trainer: L.Trainer) -> bool:
        return trainer.global_step != self.last_synced_step or bool(getattr(self.engine, "needs_sync", False))

    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Push the policy's weights into the engine when it lacks the current ones (:meth:`_needs_sync`)."""
        if self._needs_sync(trainer):
            self.engine.sync_weights(pl_module.policy)
            self.last_synced_step = trainer.global_step
            self.num_syncs += 1

    # ----------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Register with the trainer's :class:`~lightning_rl.plugins.MemoryAwarePrecision`, if it has one."""
        self._trainer = trainer
        self._data_prompt_tokens = None  # measured again for this fit's data (kv_prompt_tokens="data")
        plugin = trainer.precision_plugin
        self._plugin = plugin if isinstance(plugin, MemoryAwarePrecision) else None
        if self._plugin is not None:
            self._plugin.register_rollout(self)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Create the engine when the prompts per step are known, else at the first batch.

        Under a strategy that restores checkpoints after this hook (FSDP, DeepSpeed) it also waits for the first
        batch: a resumed engine's seed then counts the restored step (:meth:`load_state_dict`) and repeats none of
        the first run's sampling.
        """
        n = self.prompts_per_step or datamodule_batch_size(trainer)
        if self.engine is None and n is not None and not _restores_after_fit_start(trainer):
            self._create(trainer, pl_module, n)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Wake, sync if the policy changed, generate, sleep; attach ``batch["rollout"]``."""
        if not isinstance(batch, dict) or "prompt" not in batch:
            raise TypeError("VLLMRollout needs dict batches with a 'prompt' key (the prompt DataModules give them)")
        prompts = batch["prompt"]
        if self.engine is None:
            self._create(trainer, pl_module, self.prompts_per_step or len(prompts))
        if self.overlapping:
            self._overlapped_rollout(trainer, pl_module, batch, batch_idx)
            return
        engine, plugin = self.engine, self._plugin
        t0 = time.perf_counter()
        if plugin is not None:
            plugin.offload_for_rollout()  # optimizer states to pinned CPU memory while the engine is awake
        engine.wake_up()
        t1 = time.perf_counter()
        self._sync(trainer, pl_module)
        t2 = time.perf_counter()
        try:
            rollout = pl_module.generate_rollout(prompts, engine=engine)
        finally:
            t3 = time.perf_counter()
            engine.sleep()
            if plugin is not None:
                plugin.restore_after_rollout()
            t4 = time.perf_counter()
        batch["rollout"] = rollout
        self.num_rollouts += 1
        self.last_timings = {"wake_s": t1 - t0, "sync_s": t2 - t1, "generate_s": t3 - t2, "sleep_s": t4 - t3,
                             "toggle_s": (t2 - t0) + (t4 - t3), **engine_step_timings(rollout)}
        pl_module.log_dict({f"rollout/{k}": v for k, v in self.last_timings.items()}, on_step=True, on_epoch=False,
                           batch_size=len(prompts))

    def _overlapped_rollout(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        """Take this batch's rollout (generated during the last update, else now), start the next batch's."""
        prompts, engine = batch["prompt"], self.engine
        t0 = time.perf_counter()
        taken = self._ahead.take(prompts)
        t1 = time.perf_counter()
        if taken is None:  # the first batch of a run or an epoch: nothing was generated ahead
            self._sync(trainer, pl_module)
            rollout, staleness, background_s = pl_module.generate_rollout(prompts, engine=engine), 0, 0.0
        else:
            rollout, weights_step = taken
            rollout, staleness = rollout.to(pl_module.device), trainer.global_step - weights_step
            background_s = self._ahead.last_generate_s
        rollout.extras["staleness"] = staleness  # what GRPO's importance_sampling="auto" corrects
        t2 = time.perf_counter()
        upcoming = next_batch_prompts(trainer, batch_idx, getattr(pl_module, "optimizer_steps_per_batch", 1))
        if upcoming is not None or getattr(engine, "syncs_before_each_update", False):
            self._sync(trainer, pl_module)  # the weights this update starts from (a shared merged base reads them)
        if upcoming is not None:
            self._ahead.submit(upcoming, trainer.global_step, _upcoming_job(pl_module, engine, upcoming))
        t3 = time.perf_counter()
        batch["rollout"] = rollout
        self.num_rollouts += 1
        # generate_s: generated in place (the first batch of an epoch); background_generate_s: how long this
        # batch's rollout took to generate beside the last update
        self.last_timings = {"wait_s": t1 - t0, "generate_s": t2 - t1, "sync_s": t3 - t2,
                             "toggle_s": t3 - t2, "staleness": float(staleness),
                             "background_generate_s": background_s, **engine_step_timings(rollout)}
        if self.gpu_yield is not None:  # the last update's waits for its own kernels while the engine generated
            self.last_timings["gpu_yield_waits"] = float(self.gpu_yield.take_waits())
        pl_module.log_dict({f"rollout/{k}": v for k, v in self.last_timings.items()}, on_step=True, on_epoch=False,
                           batch_size=len(prompts))

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Merge the current adapters into an engine whose weights are the policy's LoRA base, before validating.

        Validation generates with the policy itself, whose base (``share_merged_base``) holds the adapters of the
        last sync; a rollout the engine is generating ahead ends first, so its weights do not change under it.
        Only a validation batch that finds the engine behind syncs (so none of a loop without batches).
        """
        if (self.engine is not None and getattr(self.engine, "syncs_before_each_update", False)
                and self._needs_sync(trainer)):
            self._ahead.wait()
            self._sync(trainer, pl_module)

    def shutdown(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        self._ahead.close()  # a rollout still being generated ends first
        if self.gpu_yield is not None:
            self.gpu_yield.remove()
            self.gpu_yield = None
        engine, self.engine = self.engine, None
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        if self.expandable_segments:  # a later engine in this process may need vLLM's sleep mode
            disable_expandable_segments()
            self.expandable_segments = False

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Shut the engine down at the end of fitting."""
        self.shutdown()
        self._trainer = self._plugin = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Shut the engine down so a failed run gives the GPU memory back."""
        self.shutdown()

    # ----------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """Seed and sync bookkeeping for a resumed run."""
        return {"seed": self.settings.seed, "last_synced_step": self.last_synced_step, "num_syncs": self.num_syncs,
                "num_rollouts": self.num_rollouts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed and counters; the engine seeds from ``seed + last synced step``."""
        self.settings = dataclasses.replace(self.settings, seed=int(state_dict.get("seed", self.settings.seed)))
        self._restored_step = int(state_dict.get("last_synced_step") or 0)
        self.num_syncs = int(state_dict.get("num_syncs", 0))
        self.num_rollouts = int(state_dict.get("num_rollouts", 0))
