"""Shared base of the RL LightningModules: the policy, its tokenizer, LoRA, log-probs, optimizer."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_rl.compiled_layers import auto_compile_layers, compile_decoder_layers, run_earns_compile
from lightning_rl.dropout import disable_dropout
from lightning_rl.hparams import portable, resolve_factory
from lightning_rl.logprobs import (
    BACKENDS,
    Backend,
    completion_hidden_states,
    completion_logprobs,
    packed_completion_hidden_states,
    packed_completion_logprobs,
    unwrap,
)
from lightning_rl.lora import apply_lora, is_lora, lora_config
from lightning_rl.models import (
    EMBEDDED_DEFAULT,
    activation_checkpointing_on,
    enable_activation_checkpointing,
    load_policy,
)
from lightning_rl.modules.checkpoint_weights import (
    check_reference,
    drop_rebuildable,
    rebuildable,
    reference_fingerprint,
    restore_rebuilt,
)
from lightning_rl.modules.config_checks import (
    check_one_optimizer,
    check_optimizer_settings,
    check_step_limit,
    check_trainer_settings,
    steps_overshoot,
)
from lightning_rl.modules.default_optimizer import default_adamw
from lightning_rl.modules.health import RunHealth
from lightning_rl.modules.load_dtype import policy_load_dtype
from lightning_rl.modules.metrics import StepMetrics
from lightning_rl.modules.resume_state import rng_states, rng_states_for, rng_states_of_every_process, set_rng_states
from lightning_rl.modules.rollout_layout import rows_host_lengths
from lightning_rl.modules.sequence_limits import encode_within_positions
from lightning_rl.modules.sharding import (
    check_strategy,
    fully_shard_policy,
    gradient_norm,
    is_fully_sharded,
    is_model_parallel,
)
from lightning_rl.modules.step_sizes import StepSizes
from lightning_rl.packing import packing_unsupported
from lightning_rl.prompting import Prompt, encode_prompts
from lightning_rl.rewards.reward_set import RewardSet
from lightning_rl.rollout.engine import Rollout, RolloutEngine, SamplingConfig
from lightning_rl.rollout.hf import HFEngine
from lightning_rl.samples import StepSamples, per_completion
from lightning_rl.tiled_mlp import check_tiling, tile_decoder_mlps
from lightning_rl.unsharded import full_state_dict, load_full_state_dict

log = logging.getLogger(__name__)


RESUME_KEY = "lightning_rl_resume"  # checkpoint entry: random state and step counters of the module
MODULE_CLASS_KEY = "lightning_rl_module_class"  # checkpoint entry: import path of the module's class
DEFAULT_LEARNING_RATE = 1e-5
DEFAULT_SAMPLING = SamplingConfig(max_new_tokens=64, temperature=1.0)  # the modules' default ``sampling``


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients stayed NaN/inf for several optimizer steps in a row."""


class PolicyModule(StepSizes, StepMetrics, L.LightningModule):
    """Base class: loads the policy in ``configure_model`` and owns what every RL method shares.

    Each argument below is documented here once; the method modules (``GRPO``, ``PPO``, ``DPO``, ...)
    take their own arguments and pass the rest on (``**kwargs``), which LightningCLI resolves to this
    signature: YAML keys are checked and ``--help`` lists them all.

    Args:
        model: model source (see :func:`lightning_rl.models.load_policy`).
        model_config: config overrides for the tiny test models.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``).
        lora: LoRA settings (a peft ``LoraConfig`` or a mapping such as ``{"r": 16}``); None trains all weights.
        learning_rate: learning rate of the default optimizer, AdamW (PyTorch's fused kernel on CUDA, except under
            Lightning's ``bf16-mixed``/``16-mixed`` precision and FSDP: :mod:`~lightning_rl.modules.default_optimizer`).
        weight_decay: weight decay of the default AdamW.
        optimizer: another optimizer, a callable ``params -> Optimizer`` (LightningCLI ``OptimizerCallable``,
            e.g. ``{class_path: torch.optim.SGD, init_args: {lr: 0.01}}``); it takes its own learning rate,
            so ``learning_rate`` and ``weight_decay`` must then stay at their defaults.
        lr_scheduler: a callable ``optimizer -> LRScheduler``, stepped once per optimizer step.
        max_grad_norm: clip the gradient norm to this (None or 0 disables).
        logprob_backend: ``auto`` (Triton kernel on CUDA), ``triton`` or ``reference``.
        logprob_chunk_size: tokens per chunk in the reference log-prob path.
        pack_sequences: lay each sequence's real tokens end to end in one row, without padding, for the log-prob
            forwards (:mod:`~lightning_rl.packing`; variable-length flash attention on CUDA). None (default): on
            for a model that supports it on CUDA under 16-bit autocast or in 16-bit weights; True also elsewhere
            (a slower reference attention on a CPU), and an error for a model that cannot be packed.
        system_prompt: optional system message added to every prompt.
        chat_template: render plain-text prompts with the tokenizer's chat template.
        max_prompt_length: refuse longer prompts (or left-truncate them with ``truncate_prompts``).
        truncate_prompts: keep the last ``max_prompt_length`` tokens instead of refusing.
        gradient_checkpointing: recompute activations in the backward to save memory. None (default):
            on when training on a CUDA device, off on a CPU (see :meth:`setup`).
        offload_checkpoints: with gradient checkpointing on a CUDA device, keep each checkpointed layer's saved
            inputs (the residual stream) in pinned host memory until the backward recomputes that layer
            (:mod:`lightning_rl.checkpoint_offload`): the device holds about two layers' inputs
            instead of every layer's, for a copy to the host in the forward and back in the backward. The memory
            plan counts it. None (default): on when :class:`~lightning_rl.plugins.MemoryAwarePrecision` plans a
            rollout engine that generates during the update, where the generation hides the copies
            (:meth:`offload_checkpoints_beside_engine`); off otherwise. A CPU has nothing to offload (it stays
            off there).
        compile_layers: run the decoder layers through ``torch.compile`` during the update (fused norms,
            activations and rotary embeddings; one compile shared by all layers, see
            :mod:`lightning_rl.compiled_layers`). None (default): on for a full fine-tune or LoRA on one CUDA
            device per process (not under ``ModelParallelStrategy``, never on a CPU), the configurations
            measured faster end to end (bench/results/vs_trl_NOTES.md), in a run long enough to earn the first
            step's compile: no ``max_steps``, or at least 200 (500 with LoRA;
            :func:`~lightning_rl.compiled_layers.auto_compile_layers`); resolved in :meth:`setup`.
        tile_mlps: run each decoder layer's MLP over slices of the tokens in the update, keeping only its input
            for the backward (:mod:`lightning_rl.tiled_mlp`): the recomputed layer's ``[tokens, intermediate]``
            tensors exist for one slice at a time, for one more MLP forward; the memory plan counts it. Off by
            default: not yet measured end to end. Compiled layers with sliced MLPs checkpoint through the
            library's reentrant checkpoint (:func:`~lightning_rl.tiled_mlp.check_tiling`; PyTorch's checkpoint
            around them failed on CUDA; on an H200 the compiled, packed case with offloaded inputs now trains as the
            whole MLP does, the kept-input case is CPU-tested); refused under FSDP2 sharding.
        max_nonfinite_steps: consecutive optimizer steps with NaN/inf loss or gradients that are
            skipped (weights untouched) before training stops with an error.
        max_unscored_steps: training steps in a row in which no completion got a reward (every
            reward function returned None/NaN) before training stops with an error; 0 never stops.
        disable_dropout: set the loaded model's dropout to 0 (:func:`~lightning_rl.dropout.disable_dropout`), so that
            the update in train mode scores tokens as the rollout sampled them: with dropout, the ratio to the
            rollout's log-probs and the KL to the reference would differ from 1 and 0 before any step. LoRA's
            ``lora_dropout`` stays as set. On by default (most decoder models have none); False keeps it.

    Attributes the rollout callback and the precision plugin read (see :meth:`training_shape`):
        policy, tokenizer, eos_token_ids: the model being trained and how its completions end.
        sampling: how training completions are sampled (None: this module never samples).
        num_generations: completions sampled per prompt.
        max_prompt_length: longest prompt in tokens.
        micro_batch_size: sequences (or examples, see ``sequences_per_example``) per forward/backward;
            None sizes micro-batches from ``micro_batch_tokens``.
        micro_batch_tokens: the token budget of a micro-batch (memory plan or :meth:`auto_micro_batch_tokens`).
        generates_rollouts: whether a training step samples completions.
    """

    #: Sequences per ``generate`` call of the default engine.
    generation_batch_size: int = 64
    #: The reward functions, for the modules that score completions.
    rewards: RewardSet | None = None
    #: Constructor arguments left out of ``hparams`` (objects that cannot be stored as plain data).
    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        model: str = EMBEDDED_DEFAULT,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        lora: dict[str, Any] | None = None,
        learning_rate: float = DEFAULT_LEARNING_RATE,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        logprob_backend: Backend = "auto",
        logprob_chunk_size: int = 1024,
        pack_sequences: bool | None = None,
        system_prompt: str | None = None,
        chat_template: bool = True,
        max_prompt_length: int | None = 512,
        truncate_prompts: bool = False,
        gradient_checkpointing: bool | None = None,
        offload_checkpoints: bool | None = None,
        compile_layers: bool | None = None,
        tile_mlps: bool = False,
        max_nonfinite_steps: int = 3,
        max_unscored_steps: int = 3,
        disable_dropout: bool = True,
    ) -> None:
        super().__init__()
        if logprob_backend not in BACKENDS:
            raise ValueError(f"logprob_backend must be one of {BACKENDS}, got {logprob_backend!r}")
        if learning_rate <= 0 or not math.isfinite(learning_rate):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
        check_optimizer_settings(weight_decay, max_grad_norm)
        check_one_optimizer(optimizer, learning_rate, weight_decay, DEFAULT_LEARNING_RATE)
        check_step_limit("max_nonfinite_steps", max_nonfinite_steps, 1)
        check_step_limit("max_unscored_steps", max_unscored_steps, 0)
        check_step_limit("logprob_chunk_size", logprob_chunk_size, 1)
        if max_prompt_length is not None:
            check_step_limit("max_prompt_length", max_prompt_length, 1)
        if offload_checkpoints and gradient_checkpointing is False:
            raise ValueError("offload_checkpoints=True offloads the inputs that gradient checkpointing keeps; leave "
                             "gradient_checkpointing at None (on on CUDA) or True, or drop offload_checkpoints")
        self.save_hyperparameters(ignore=list(self.hparams_ignore))  # every subclass's arguments, defaults included
        self.automatic_optimization = False
        self.model_source = model
        self.model_config = model_config
        self.dtype_name = dtype
        if lora is not None:
            lora_config(lora)  # a misspelled field is refused now, not after the model has loaded
        self.lora = lora
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optimizer_factory = resolve_factory(optimizer, "optimizer")  # a stored import path or spec, on load
        self.lr_scheduler_factory = resolve_factory(lr_scheduler, "lr_scheduler")
        self.max_grad_norm = max_grad_norm
        self.logprob_backend = logprob_backend
        self.logprob_chunk_size = logprob_chunk_size
        if pack_sequences not in (None, True, False):
            raise ValueError(f"pack_sequences must be None (pack where supported), True or False, got "
                             f"{pack_sequences!r}")
        self.pack_sequences = pack_sequences
        self._packs: dict[int, bool] = {}  # id(model) -> whether its forwards pack (a supported model on CUDA)
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.max_prompt_length = max_prompt_length
        self.truncate_prompts = truncate_prompts
        self.gradient_checkpointing_setting = gradient_checkpointing
        self.gradient_checkpointing = bool(gradient_checkpointing)  # resolved in setup() when None
        self.offload_checkpoints_setting = offload_checkpoints
        self.offload_checkpoints = False  # resolved in setup(): CUDA only
        self.compile_layers_setting = compile_layers
        self.compile_layers = bool(compile_layers)  # resolved in setup() when None
        if tile_mlps not in (True, False):
            raise ValueError(f"tile_mlps must be True or False, got {tile_mlps!r}")
        self.tile_mlps = tile_mlps
        if disable_dropout not in (True, False):
            raise ValueError(f"disable_dropout must be True or False, got {disable_dropout!r}")
        self.disable_dropout = disable_dropout
        self.max_nonfinite_steps = max_nonfinite_steps
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self._frozen_reference: list[nn.Module] = []  # kept out of the state dict and of .parameters()
        self._nonfinite_streak = 0
        self._skipped_steps = 0  # optimizer steps skipped in the current training batch
        self.health = RunHealth(max_unscored_steps)
        self._rng_to_restore: dict[str, Any] | None = None
        self.rollout_engine: RolloutEngine | None = None
        self.micro_batch_tokens: int | None = None  # set by the memory plan or on_fit_start (micro_batch_size None)
        self.last_samples: StepSamples | None = None  # the last training step's rows, for sample tables

    # ----------------------------------------------------------------------------- model
    @override
    def configure_model(self) -> None:
        """Load the policy and tokenizer once (idempotent), add LoRA, and keep a reference if needed.

        Under ``ModelParallelStrategy`` the trained modules are sharded here too, also when the policy was
        loaded before the fit (by :meth:`evaluate`, say): the optimizer is built after this hook.
        """
        if self.policy is not None:
            self.apply_sharding()
            return
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        net, tok = load_policy(self.model_source, self.model_config,
                               policy_load_dtype(self.dtype_name, self.lora, plugin))
        self.drop_dropout(net)
        if self.needs_reference_model and self.lora is None:
            ref = copy.deepcopy(net).eval().requires_grad_(False)
            self._frozen_reference = [ref]
        self.policy = apply_lora(net, self.lora)
        self.tokenizer = tok
        self.apply_gradient_checkpointing()
        self.apply_compile_layers()
        self.apply_tile_mlps()
        self.apply_sharding()

    def drop_dropout(self, model: nn.Module) -> None:
        """With ``disable_dropout``, set ``model``'s dropout to 0 before LoRA wraps it (logged when there was any)."""
        if not self.disable_dropout:
            return
        changed = disable_dropout(model)
        if changed:
            log.info("%s: dropout set to 0 in %d places of %s, so that the update scores tokens as the rollout "
                     "sampled them (disable_dropout=False keeps it)", type(self).__name__, changed,
                     type(model).__name__)

    @override
    def setup(self, stage: str) -> None:
        """Refuse a strategy that cannot run manual optimization sharded; resolve the ``None`` (automatic) settings.

        ``gradient_checkpointing=None`` is resolved for the trainer's device before the memory plan reads it;
        ``compile_layers=None`` for the device and the strategy (:func:`auto_compile_layers`).

        Raises:
            ValueError: Lightning's ``FSDPStrategy`` (see :mod:`lightning_rl.modules.sharding`), or ``tile_mlps``
                where it cannot run (:func:`~lightning_rl.tiled_mlp.check_tiling`).
        """
        if self._trainer is not None:
            check_strategy(self._trainer.strategy)
            stop = steps_overshoot(self._trainer.max_steps, self.optimizer_steps_per_batch) if stage == "fit" else None
            if stop is not None:
                log.warning("%s: max_steps=%d is not a multiple of the %d optimizer steps each training batch makes, "
                            "and the Trainer checks it between batches: this run stops at step %d",
                            type(self).__name__, self._trainer.max_steps, self.optimizer_steps_per_batch, stop)
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        if self.gradient_checkpointing_setting is None:
            self.gradient_checkpointing = device.type == "cuda"
        self.offload_checkpoints = bool(self.offload_checkpoints_setting) and device.type == "cuda"
        if self.offload_checkpoints_setting and device.type != "cuda":
            log.info("offload_checkpoints: training on %s, where activations already live in host memory; "
                     "nothing to offload", device.type)
        sharded = self._trainer is not None and is_model_parallel(self._trainer.strategy)
        if self.compile_layers_setting is None:
            max_steps = self._trainer.max_steps if self._trainer is not None else -1
            compilable = auto_compile_layers(device.type, sharded=sharded)  # the device and strategy allow it
            self.compile_layers = compilable and run_earns_compile(max_steps,
                                                                   lora=self.lora is not None or is_lora(self.policy))
            if compilable and not self.compile_layers:
                log.info("compile_layers=None: the decoder layers stay eager for this run of max_steps=%d, too short "
                         "to earn their first step's compile (compile_layers=True compiles them anyway)", max_steps)
        check_tiling(self.tile_mlps, sharded)

    def apply_gradient_checkpointing(self, reapply: bool = False) -> None:
        """With ``gradient_checkpointing``, turn on activation recomputation in :meth:`checkpointed_models`.

        transformers recomputes only while the model is in train mode, which :meth:`on_train_batch_start`
        ensures for the update. ``reapply``: set it up again where it is on (to drop offloading).
        """
        if not self.gradient_checkpointing:
            return
        for model in self.checkpointed_models():
            net = unwrap(model)
            if not getattr(net, "supports_gradient_checkpointing", True):
                continue
            if activation_checkpointing_on(net) and not self.offload_checkpoints and not reapply:
                continue
            enable_activation_checkpointing(net, offload=self.offload_checkpoints)
            if is_lora(model):
                net.enable_input_require_grads()

    def offload_checkpoints_beside_engine(self) -> bool:
        """``offload_checkpoints=None``: offload the checkpointed inputs, since a rollout engine runs beside the update.

        :class:`~lightning_rl.plugins.MemoryAwarePrecision` calls it when its plan has an engine process that keeps
        its memory and generates the next rollout during the update: the device then holds both, and the update's
        copies to and from the host come out of time the generation takes anyway. Returns True when that switched
        offloading on (a CUDA device, gradient checkpointing on).
        """
        if self.offload_checkpoints_setting is not None or self.offload_checkpoints or not self.gradient_checkpointing:
            return False
        if self.device.type != "cuda" or self.policy is None:
            return False
        self.offload_checkpoints = True
        self.apply_gradient_checkpointing()
        return True

    def keep_checkpoints_on_device(self) -> None:
        """Undo :meth:`offload_checkpoints_beside_engine`: the rollout engine generates between updates after all."""
        if self.offload_checkpoints_setting is None and self.offload_checkpoints:
            self.offload_checkpoints = False
            self.apply_gradient_checkpointing(reapply=True)

    def apply_compile_layers(self) -> None:
        """With ``compile_layers``, run the decoder layers of :meth:`checkpointed_models` compiled in the update."""
        if not self.compile_layers:
            return
        for model in self.checkpointed_models():
            compile_decoder_layers(model)

    def apply_tile_mlps(self) -> None:
        """With ``tile_mlps``, slice the decoder layers' MLPs of :meth:`checkpointed_models` over the tokens."""
        if not self.tile_mlps:
            return
        for model in self.checkpointed_models():
            tile_decoder_mlps(model)

    def apply_sharding(self) -> None:
        """Under ``ModelParallelStrategy``, shard the trained modules and the frozen reference copy with FSDP2 over
        its device mesh (idempotent).

        The trained modules are :meth:`checkpointed_models` and :meth:`other_trained_modules`: every parameter
        that gets a gradient must live in an FSDP2 unit, which also reduces its gradient over the processes.
        The frozen reference of a full fine-tune is sharded alike, so each process holds its share of it rather
        than the whole model. A precision plugin that stores weights in its own dtypes (``MemoryAwarePrecision``)
        converts them first: FSDP2 fixes each parameter's dtype when it shards.
        """
        mesh = self.device_mesh if self._trainer is not None else None
        if mesh is None:
            return
        convert = getattr(self._trainer.precision_plugin, "convert_before_sharding", None)
        for model in [*self.checkpointed_models(), *self.other_trained_modules(), *self._frozen_reference]:
            if convert is not None and not is_fully_sharded(model):
                convert(model)
            fully_shard_policy(model, mesh)

    def other_trained_modules(self) -> list[nn.Module]:
        """Trained modules besides :meth:`checkpointed_models` (PPO's value head); none here."""
        return []

    def checkpointed_models(self) -> list[nn.Module]:
        """The trained models whose layers recompute activations with ``gradient_checkpointing`` (the policy)."""
        return [self.policy] if self.policy is not None else []

    def export(self, out: str | Path, merge: bool = False, base_model: str | None = None,
               dtype: str | None = None) -> Path:
        """Write the policy as a Hugging Face folder: merged weights, or (LoRA, ``merge=False``) a peft adapter.

        See :func:`lightning_rl.export.export_policy`; ``dtype`` defaults to the module's ``dtype`` and casts the
        merged weights, or the adapter's and the written base's. LoRA merges in fp32 (a bf16 base under
        :class:`~lightning_rl.plugins.MemoryAwarePrecision` would round the update away), and a fit's host-held fp32
        masters are what is written. The same from a checkpoint:
        ``lightning-rl export --ckpt_path RUN.ckpt --out DIR [--merge]``.
        """
        from lightning_rl.export import export_policy

        self.configure_model()
        return export_policy(self.policy, self.tokenizer, out, self.model_source, merge=merge, base_model=base_model,
                             dtype=dtype or self.dtype_name, title=type(self).__name__)

    @property
    def needs_reference_model(self) -> bool:
        """Whether the method needs reference log-probs (subclasses decide)."""
        return False

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a completion (tokenizer EOS plus the generation config's)."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.policy, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, Sequence):
            ids.update(extra)
        return sorted(i for i in ids if i is not None)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make sure the policy exists before its weights are loaded; keep the random state for a resumed fit."""
        self.configure_model()
        state = checkpoint.get(RESUME_KEY) or {}
        restore_rebuilt(self, checkpoint.get("state_dict", {}), state.get("rebuilt_weights"))
        if state.get("reference") is not None and self._frozen_reference:
            load_full_state_dict(self._frozen_reference[0], state["reference"])
        if self._frozen_reference:
            check_reference(self._frozen_reference[0], state.get("reference_fingerprint"), self.model_source)
        self._nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.health.load_state_dict(state.get("health") or {})
        if self._trainer is not None and self.trainer.state.fn == "fit":  # resuming a fit, not load_from_checkpoint
            world_size = self.trainer.world_size
            self._rng_to_restore = rng_states_for(state, self.trainer.global_rank, world_size)
            every = state.get("rng_per_process")
            if every is not None and len(every) != world_size:
                rank_zero_warn(f"the checkpoint was written by {len(every)} processes and this run has {world_size}: "
                               "each process keeps the random state it was seeded with, so the resumed run samples "
                               "other completions than the interrupted one would have. Resume with "
                               f"{len(every)} processes to continue it exactly.")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store hyperparameters as plain data, so checkpoints load with ``weights_only=True``.

        Callables become import paths or ``{"class_path", "init_args"}`` specs (resolved again on
        load); one that cannot be written so (a lambda, say) is stored as None and has to be
        passed again: ``Module.load_from_checkpoint(path, reward_funcs=[...])``. Frozen weights the
        model source gives back on load (a LoRA base) are left out; the random state is kept for resuming.
        """
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            hparams = {**self.hparams_initial, **hparams}  # Trainer.fit drops unpicklable ones (a lambda reward)
            checkpoint["hyper_parameters"] = {k: portable(v) for k, v in hparams.items()}
        state: dict[str, Any] = {"rng": rng_states(), "nonfinite_streak": self._nonfinite_streak,
                                 "health": self.health.state_dict()}
        every = rng_states_of_every_process()  # collective: each process resumes with its own
        if every is not None:
            state["rng_per_process"] = every
        if "state_dict" in checkpoint:
            state["rebuilt_weights"] = drop_rebuildable(self, checkpoint["state_dict"])
        if self._frozen_reference and not rebuildable(self.model_source):  # a random tiny model: keep its copy
            state["reference"] = full_state_dict(self._frozen_reference[0])
        elif self._frozen_reference:  # rebuilt from the source on load: checked against this fingerprint
            state["reference_fingerprint"] = reference_fingerprint(self._frozen_reference[0])
        checkpoint[RESUME_KEY] = state
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    @override
    def on_train_start(self) -> None:
        """In a resumed fit, put back the random state of the interrupted run (rollouts sample as it would).

        Over several processes, every process takes the smallest micro-batch any of them sized
        (:meth:`agree_micro_batches_over_processes`).
        """
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self.agree_micro_batches_over_processes()

    def agree_micro_batches_over_processes(self) -> None:
        """Give every process the smallest ``micro_batch_size`` and ``micro_batch_tokens`` of all of them.

        Each process sizes its micro-batches from its own device: its free memory, or its memory plan (NVML's
        figures, the shards it holds), rounded down to whole sequences. Two processes can then differ by a
        sequence, and so by a backward a step; each backward of a DDP module is a collective, and the process
        with one more waits forever. One all-reduce when training starts; nothing in a single process.
        """
        if self.sum_over_processes() is None:
            return
        mine = [self.micro_batch_size, self.micro_batch_tokens]
        least = self.reduce_over_processes([math.inf if v is None else v for v in mine], dist.ReduceOp.MIN)
        agreed = [None if math.isinf(v) else int(v) for v in least]
        if agreed != mine:
            log.info("micro-batches agreed over the processes: micro_batch_size %s -> %s, micro_batch_tokens %s -> %s",
                     mine[0], agreed[0], mine[1], agreed[1])
        self.micro_batch_size, self.micro_batch_tokens = agreed

    @override
    def on_fit_start(self) -> None:
        """Move the frozen reference copy (not a registered submodule) to the training device.

        Also puts the module in train mode (transformers loads models in eval mode; Lightning would
        otherwise warn about it before the first batch), turns on gradient checkpointing for a policy
        loaded before the trainer resolved the setting (e.g. by :meth:`evaluate` before ``fit``), and
        sizes micro-batches when ``micro_batch_size`` is None and no memory plan did
        (:meth:`auto_micro_batch_tokens`).
        """
        for ref in self._frozen_reference:
            if not is_fully_sharded(ref):  # FSDP2 put its shards on the device
                ref.to(self.device)
        self.train()
        self.apply_gradient_checkpointing()
        self.apply_compile_layers()
        self.apply_tile_mlps()
        if self.micro_batch_size is None and self.micro_batch_tokens is None:
            self.micro_batch_tokens = self.auto_micro_batch_tokens()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Train mode for the update (dropout, gradient checkpointing); rollouts switch to eval themselves.

        transformers loads models in eval mode and Lightning keeps the mode a submodule has, so without
        this the policy would train in eval mode. The frozen reference copy is not a registered
        submodule and stays in eval mode.
        """
        self.train()

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """Sample completions, a report at the end of fit, a step-counting progress bar, GC pauses kept out of steps.

        GC: :class:`~lightning_rl.callbacks.gc_pauses.FreezeLongLivedObjects`.

        Each is added only when the Trainer has none of its kind (see
        :func:`~lightning_rl.callbacks.defaults.default_callbacks`); pass your own to change its settings.

        Lightning asks for them before it checks its settings, so a fit first refuses here, with what to use
        instead, the Trainer settings of automatic optimization (``accumulate_grad_batches``,
        ``gradient_clip_val``; :func:`~lightning_rl.modules.config_checks.check_trainer_settings`).
        """
        from lightning_rl.callbacks.defaults import default_callbacks

        trainer = self.trainer
        if trainer.state.fn == TrainerFn.FITTING:
            check_trainer_settings(trainer.accumulate_grad_batches, trainer.gradient_clip_val)
        return default_callbacks(trainer)

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps of one training batch, which the Trainer's ``global_step`` and ``max_steps`` count."""
        return 1

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference policy: the adapter-disabled base with LoRA, else a frozen copy.

        A copy sharded with FSDP2 gives its gathered root unit (embedding, final norm, head) back on exit: FSDP2
        keeps a root gathered after its forward for the backward that a no-grad forward never runs.
        """
        if is_lora(self.policy):
            with self.policy.disable_adapter():
                yield self.policy
        elif self._frozen_reference and is_fully_sharded(self._frozen_reference[0]):
            try:
                yield self._frozen_reference[0]
            finally:
                unwrap(self._frozen_reference[0]).reshard()
        elif self._frozen_reference:
            yield self._frozen_reference[0].to(self.device)
        else:
            raise RuntimeError("this module keeps no reference model (needs_reference_model is False)")

    # ----------------------------------------------------------------------------- tokens
    def encode(self, prompts: Sequence[Prompt], names: Sequence[str] | None = None) -> list[list[int]]:
        """Token ids of prompts, rendered with the chat template and checked against the length limit.

        ``names`` say what each prompt is in an error ("train row 25"); by default its position in the batch.
        """
        return encode_prompts(
            self.tokenizer, prompts, self.system_prompt, self.chat_template,
            self.max_prompt_length, self.truncate_prompts, names,
        )

    def decode_completions(self, rollout: Rollout) -> list[str]:
        """Completion texts without special tokens or padding."""
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def packs_sequences(self, model: nn.Module) -> bool:
        """Whether :meth:`sequence_logprobs` packs ``model``'s sequences (see ``pack_sequences``).

        Raises:
            ValueError: ``pack_sequences=True`` for a model that cannot be packed.
        """
        if self.pack_sequences is False:
            return False
        if id(model) not in self._packs:
            why = packing_unsupported(model)
            if why is not None and self.pack_sequences:
                raise ValueError(f"pack_sequences=True, but {why}: set pack_sequences=False (or leave it at None)")
            self._packs[id(model)] = why is None and (bool(self.pack_sequences) or next(model.parameters()).is_cuda)
            if why is not None:
                log.info("pack_sequences: not packing, as %s", why)
        if not self._packs[id(model)] or self.pack_sequences:
            return self._packs[id(model)]
        half = (torch.float16, torch.bfloat16)
        return torch.is_autocast_enabled("cuda") or next(model.parameters()).dtype in half

    def packed_length_bound(self) -> int | None:
        """The longest sequence the packed attention is sized for: the prompt limit plus ``max_new_tokens``.

        A bound fixed for the run keeps compiled layers from recompiling for each batch's longest sequence; None
        (no limit known) sizes it from each batch.
        """
        sampling = getattr(self, "sampling", None)
        return None if self.max_prompt_length is None or sampling is None else (
            self.max_prompt_length + sampling.max_new_tokens)

    def completion_token_logprobs(
        self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor, temperature: float, lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropy ``[N, C]`` under ``model``: packed when :meth:`packs_sequences` says so.

        ``lengths``: each row's prompt and completion lengths in host memory, with which packing reads no device.
        """
        args = (model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        kwargs = dict(temperature=temperature, backend=self.logprob_backend, chunk_size=self.logprob_chunk_size)
        if self.packs_sequences(model):
            return packed_completion_logprobs(*args, **kwargs, max_len=self.packed_length_bound(), lengths=lengths)
        return completion_logprobs(*args, **kwargs)

    def completion_hidden(
        self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Final hidden states ``[N, C, H]`` that predict the completion tokens, for a value head.

        Packed when :meth:`packs_sequences` says so (then zero on padding).
        """
        args = (model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if self.packs_sequences(model):
            return packed_completion_hidden_states(*args, max_len=self.packed_length_bound())
        return completion_hidden_states(*args)

    def sequence_logprobs(
        self, model: nn.Module, rollout: Rollout, rows: slice | torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropy of the completions ``rows`` of ``rollout`` under ``model``."""
        return self.completion_token_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                              rollout.completion_ids[rows], rollout.completion_mask[rows], temperature,
                                              rows_host_lengths(rollout, rows))

    # ----------------------------------------------------------------------------- rollouts and rewards
    def default_engine(self) -> RolloutEngine:
        """The transformers ``generate`` engine on the policy itself (created on first use)."""
        if self.rollout_engine is None:
            self.rollout_engine = HFEngine(lambda: self.policy, self.tokenizer.pad_token_id, self.eos_token_ids,
                                           self.generation_batch_size)
        return self.rollout_engine

    def generate_rollout(
        self, prompts: Sequence[Any], engine: RolloutEngine | None = None, sampling: SamplingConfig | None = None,
        num_generations: int | None = None,
    ) -> Rollout:
        """Sample completions for ``prompts`` with ``engine`` (default: transformers ``generate``).

        ``sampling`` and ``num_generations`` default to the module's ``sampling`` and ``num_generations``.

        Raises:
            PromptTooLongError: a prompt longer than ``max_prompt_length``, or one whose completion could run past
                the model's positions (:func:`~lightning_rl.modules.sequence_limits.check_sequences_fit`).
        """
        engine, sampling = engine or self.default_engine(), sampling or self.sampling
        ids = encode_within_positions(self, prompts, sampling.max_new_tokens)
        rollout = engine.generate(ids, sampling, num_generations or self.num_generations)
        return rollout.to(self.device)

    def score(
        self, prompts: Sequence[Any], rollout: Rollout, columns: Mapping[str, Sequence[Any]], g: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Rewards of a rollout with ``g`` completions per prompt, from the module's ``rewards``.

        Returns:
            ``(total [N], per_function [N, F], completion texts)``; NaN where no function applies.
        """
        completions = self.decode_completions(rollout)
        expanded = {k: [v for v in vals for _ in range(g)] for k, vals in columns.items()}
        for k, vals in expanded.items():
            if len(vals) != len(completions):
                raise ValueError(f"column {k!r} has {len(vals) // g} values for {len(prompts)} prompts")
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, -1).tolist()
        expanded["completion_ids"] = [[t for t in row if t >= 0] for row in ids]
        total, per_fn = self.rewards(per_completion(prompts, g), completions, expanded)
        return total, per_fn, completions

    # ----------------------------------------------------------------------------- optimization
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (one by default; PPO gives its value head its own learning rate)."""
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters; check the lora settings")
        return [{"params": params}]

    @override
    def configure_optimizers(self):
        """AdamW at ``learning_rate`` (or the given optimizer) over :meth:`parameter_groups`, and a scheduler."""
        groups = self.parameter_groups()
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        else:
            plugin = self._trainer.precision_plugin if self._trainer is not None else None
            opt = default_adamw(groups, lr=self.learning_rate, weight_decay=self.weight_decay, precision_plugin=plugin)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def sum_over_processes(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """All-reduce (sum) over the trainer's processes under DDP/FSDP; None in a single process."""
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return None
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def reduce_over_processes(self, values: Sequence[float], op: dist.ReduceOp) -> list[float]:
        """``values`` reduced element-wise with ``op`` over the trainer's processes under DDP/FSDP (themselves in a
        single process). One all-reduce.

        What decides how many forwards and backwards a step makes must agree across processes: each backward of a
        DDP module all-reduces its gradients, and a process with one backward more than the others waits forever.
        """
        if self.sum_over_processes() is None:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.trainer.strategy.reduce(t, reduce_op=op).tolist()

    def optimizer_step_checked(self, loss_value: float | torch.Tensor) -> dict[str, float]:
        """Clip, check for NaN/inf, then step (or skip, leaving the weights untouched).

        One host synchronization: the loss and the gradient norm are checked together. Under DDP/FSDP
        they are averaged over the processes first, so every process makes the same decision.

        Returns:
            ``{"grad_norm": ..., "skipped": 0 or 1}``.
        """
        opt = self.optimizers()
        params = self.trainable_parameters()
        grads = [p.grad for p in params if p.grad is not None]
        # gradients the precision plugin sent to host memory during the backward (MemoryAwarePrecision's masters)
        held = getattr(getattr(self._trainer, "precision_plugin", None), "host_gradients", None)
        norm = gradient_norm(grads, self.device, None if held is None else held.squares())
        loss = torch.as_tensor(loss_value, dtype=torch.float32).to(norm.device)
        checked = torch.stack([loss, norm.float()])
        reduce = self.sum_over_processes()
        if reduce is not None:  # every process skips or steps alike: a NaN on one rank is a NaN in the sum
            checked = reduce(checked) / self.trainer.world_size
        loss_value, norm_value = checked.tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._nonfinite_streak += 1
            opt.zero_grad(set_to_none=True)
            if held is not None:
                held.drop()
            log.warning("non-finite loss (%s) or gradient norm (%s): optimizer step skipped", loss_value, norm_value)
            if self._nonfinite_streak >= self.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss or gradients were NaN/inf for {self._nonfinite_streak} optimizer steps in a row "
                    f"(last loss {loss_value}); the weights were left as they were before those steps. Lower "
                    "the learning rate, keep max_grad_norm set, use bf16 instead of fp16, or check the rewards."
                )
            self._skipped_steps += 1
            return {"grad_norm": float("nan"), "skipped": 1.0}
        self._nonfinite_streak = 0
        if self.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return {"grad_norm": norm_value, "skipped": 0.0}

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``train/skipped_steps``: optimizer steps of the batch skipped for a NaN/inf loss or gradient."""
        self.log("train/skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=True, reduce_fx="sum",
                 batch_size=1)
        self._skipped_steps = 0

    @staticmethod
    def columns_of(batch: Mapping[str, Any], exclude: Sequence[str] = ("prompt", "rollout")) -> dict[str, list]:
        """The dataset's extra columns of a batch (passed to reward functions)."""
        return {k: v for k, v in batch.items() if k not in exclude}
