"""The memory-aware precision plugin: low-precision frozen weights, fp32 masters, a memory plan, offloading.

Pass it as ``Trainer(plugins=[MemoryAwarePrecision()])`` (leave ``precision=`` unset) or in YAML
under ``trainer.plugins``. What it does:

* frozen parameters (the base under LoRA, a frozen reference copy) are stored in bf16 (fp16 where
  the GPU has no bf16), optionally in 8 or 4 bits through bitsandbytes; trainable parameters are
  kept as fp32 master weights; the forward runs under ``torch.autocast``;
* the autocast cache is cleared whenever the grad mode changes between two forwards (old and
  reference log-probs are computed under ``no_grad``) and after every backward;
* at setup it makes a :class:`~lightning_rl.plugins.memory_plan.MemoryPlan` from the module's
  :class:`~lightning_rl.shapes.TrainingShape` and, when a rollout engine shares the device, the
  :class:`~lightning_rl.plugins.rollout_memory.RolloutMemory` its owner registered (:meth:`register_rollout`):
  the micro-batch size (a token budget per micro-batch when the module's ``micro_batch_size`` is None, the
  default; a set ``micro_batch_size`` is lowered when it would not fit) and the engine's KV-cache budget, or
  a ``MemoryPlanError`` before any OOM;
* while the rollout engine is awake, optimizer states and gradients wait in pinned CPU memory when the
  plan needs that room for the engine (``offload_optimizer``);
* with ``optimizer_states="cpu"`` the optimizer states live in pinned CPU memory all the time and
  are streamed through the device in chunks of ``step_chunk_bytes`` during the optimizer step
  (see :mod:`~lightning_rl.plugins.streamed_states`): AdamW's two fp32 moments leave the device.
  The default ``"auto"`` does so when a rollout engine generates during the update (its process holds its
  memory then, and the generation hides the copies), and when the plan fits only that way, before it moves
  the rollout engine from beside the update to between updates; beside such an engine a module that left
  ``offload_checkpoints`` None also offloads its checkpointed inputs, and ``master_weights="auto"`` keeps the
  trainable linear weights' and embeddings' fp32 masters in host memory, streamed with the states
  (:meth:`MemoryAwarePrecision.shrink_beside_engine`);
* device memory (allocated, reserved, peak) is logged per phase (``memory/<phase>_<figure>_gib``).

On a CPU the frozen weights are stored in bf16 as well (half the RAM; CPU autocast runs matmuls in
bf16); pass ``frozen_dtype="float32"`` to keep them in fp32. Offloading is off on a CPU (nothing to free).

The plugin's parts live in their own modules: how weights are stored (:mod:`~lightning_rl.plugins.weight_storage`),
how the plan is made and applied (:mod:`~lightning_rl.plugins.precision_planning`), and what waits in host memory
beside a rollout engine (:mod:`~lightning_rl.plugins.host_residency`). This file holds the Lightning hooks: setup,
autocast, the optimizer step, the rollout toggle, memory figures and checkpoints.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_rl.plugins.device_context import context_bytes_for
from lightning_rl.plugins.device_memory import device_used_bytes, memory_figures
from lightning_rl.plugins.host_gradients import HostGradients
from lightning_rl.plugins.host_masters import HostMasterWeights
from lightning_rl.plugins.host_residency import HostResidency, warn_unless_per_parameter
from lightning_rl.plugins.host_step import host_step_setting
from lightning_rl.plugins.memory_plan import CONTEXT_PART, GiB, MemoryPlan, MiB
from lightning_rl.plugins.offload import OptimizerOffloader
from lightning_rl.plugins.precision_planning import MemoryPlanning
from lightning_rl.plugins.rollout_memory import RolloutMemoryProvider
from lightning_rl.plugins.streamed_states import check_streamable
from lightning_rl.plugins.weight_storage import (
    DTYPES,
    DtypeName,
    Quantize,
    default_compute_dtype,
    quantize_frozen_linears,
    require_bitsandbytes,
    store_for_training,
)
from lightning_rl.shapes import training_shape_of
from lightning_rl.tensor_norms import tensor_norms

log = logging.getLogger(__name__)

OptimizerStates = Literal["auto", "device", "cpu"]
MasterWeights = Literal["auto", "device", "cpu"]


def _lightning_module(model: nn.Module) -> L.LightningModule | None:
    seen = 0
    while not isinstance(model, L.LightningModule) and hasattr(model, "module") and seen < 4:
        model, seen = model.module, seen + 1
    return model if isinstance(model, L.LightningModule) else None


class MemoryAwarePrecision(HostResidency, MemoryPlanning, Precision):
    """Mixed precision that stores what it can small and plans device memory around the rollout engine.

    Args:
        frozen_dtype: storage dtype of frozen parameters; ``auto`` = the compute dtype.
        compute_dtype: autocast dtype; ``auto`` = bf16, or fp16 on GPUs without bf16.
        quantize: store frozen linear weights in ``int8`` or ``nf4`` with bitsandbytes (CUDA only).
        offload_optimizer: move optimizer states and gradients to pinned CPU memory while the rollout
            engine is awake. None (default): only when the memory plan's rollout phase does not fit the
            budget with them on the device (each offload costs two host copies of the states and a
            re-allocation of the training memory: ``bench/results/vs_trl_NOTES.md``); off on a CPU.
        memory_budget: device memory the process may use, as NVML and ``nvidia-smi`` count it (PyTorch's
            memory, the in-process rollout engine's, and ``context_bytes``): bytes (> 1), a fraction of the
            device (<= 1), or None (the device's total times ``utilization``; no plan on a CPU).
        utilization: fraction of the device's total used when ``memory_budget`` is None.
        plan: make a memory plan at setup (and refuse early when nothing fits).
        adjust_micro_batch: lower the module's ``micro_batch_size`` to what the plan allows.
        enforce_budget: cap PyTorch's CUDA allocator at the budget
            (``torch.cuda.set_per_process_memory_fraction``).
        activation_bytes_per_token: override the estimate of activation bytes per token.
        engine_overhead_bytes: the rollout engine's workspace beyond weights and KV cache.
        reserved_bytes: kept free in the plan for fragmentation and small buffers.
        log_memory: log memory figures per phase.
        optimizer_states: where optimizer states live between steps. ``device``: on the training device
            (as usual). ``cpu``: in pinned CPU memory; the optimizer step brings them to the device
            ``step_chunk_bytes`` at a time, steps those parameters, sends the states back and frees
            those parameters' gradients. Bit-identical results for optimizers whose step of a parameter
            depends on that parameter alone (torch's AdamW, Adam, SGD, ...: ``PER_PARAMETER_OPTIMIZERS``; another
            optimizer is streamed with a warning, since a global norm or coupling would be taken per chunk);
            costs two host-device copies of the states per step. Not for LBFGS (one global history).
            ``auto`` (default): ``cpu`` for torch's per-parameter optimizers, on a CUDA device when the plan's
            rollout engine generates during the update and the states are larger than one chunk
            (:meth:`shrink_beside_engine`), or when the plan fits only with the states in CPU memory (tried before
            the engine gives up running beside the update); ``device`` otherwise.
        step_chunk_bytes: bytes of optimizer states on the device at once with ``optimizer_states="cpu"``
            (a parameter whose states alone are larger is stepped on its own, or in slices, see below).
        split_large_parameters: with streamed states, step a parameter whose states alone exceed
            ``step_chunk_bytes`` (an embedding of a large vocabulary) in row slices of about one chunk, for Adam,
            AdamW and SGD: bit-identical, and the device holds one slice's states and temporaries. On (default):
            on an H200 the README's configuration peaked 0.07 GiB lower at the same speed.
        overlap_state_copies: with streamed states on CUDA, copy the next chunk's states (and masters) in and the
            last chunk's out on side streams while a chunk steps, so the copies and the step overlap; up to three
            chunks on the device instead of one (the plan counts them). Off by default: on an H200 the
            Qwen2.5-0.5B shape's update took 0.12 s less but its step only 0.05 s less, at 0.56 GiB more peak.
        context_bytes: the process's device memory outside PyTorch's allocator (CUDA context, libraries'
            modules), which the plan counts in both phases. None (default): measured through NVML when the plan
            is made, else 600 MiB on CUDA (:mod:`~lightning_rl.plugins.device_context`); 0 on a CPU.
        master_weights: where the fp32 masters of the trainable linear weights and embeddings live. ``device``: the
            parameters are the fp32 masters, cast by autocast. ``cpu``: the parameters hold the compute dtype
            and the fp32 masters wait in pinned host memory, streamed through the optimizer step with the
            optimizer states (so the states stream too): half the weight and gradient bytes on the device and
            no autocast casts of them (:mod:`~lightning_rl.plugins.host_masters`). For the linear weights
            bit-identical to ``device`` with one micro-batch; with several the gradients add up in the compute
            dtype. With a compute-dtype input embedding the residual stream is in the compute dtype too (as in the
            rollout engine). LoRA adapters stay fp32 on the device. One training process only. ``auto``
            (default): ``cpu`` when :meth:`shrink_beside_engine` streams the optimizer states beside a rollout
            engine that generates during the update (one process, no FSDP2 shards) and the masters are at most
            ``HOST_MASTERS_AUTO_MAX_BYTES`` (2 GiB, whose copies the generation hides), ``device`` otherwise.
        gradients_to_host: on CUDA, send each gradient of host-master weights to pinned host memory as soon as
            the backward has produced it, and bring it back with its chunk in the optimizer step
            (:mod:`~lightning_rl.plugins.host_gradients`): the backward's end no longer holds every gradient beside
            the last layer's activations. On (default): on an H200 the README configuration's PyTorch peak fell
            from 1.24 to 0.88 GiB, together with the embeddings' masters (``vs_trl_NOTES.md``). The same for the
            fp32 gradients of a full fine-tune whose states :meth:`shrink_beside_engine` streams while its masters
            stay on the device (too large to move with ``master_weights="auto"``, or ``"device"``): their copies
            come out of the generation beside the update too.
        step_on_host: with host masters whose gradients go to host memory (the two settings above), run their
            optimizer step on the CPU, where masters, states and gradients already are, instead of streaming them
            through the device: only the rounded weights cross PCIe (2 bytes per parameter instead of 26 for
            AdamW) and the device runs no kernel beside the rollout engine (:mod:`~lightning_rl.plugins.host_step`).
            A number in (0, 1) steps that share of those weights' elements on the CPU (the largest weights first)
            while the rest stream through the device at the same time; ``"auto"`` starts at half and moves the
            share after each step toward both sides ending together. Adam and AdamW only; the other parameters
            (norms, biases) stream as before. None (default): ``"auto"`` wherever it has something to step (host
            masters, their gradients sent to host memory, Adam or AdamW), silently nothing elsewhere; an explicit
            value raises or warns where it would step nothing. On an H200 (2026-12-05) ``"auto"`` took the
            Qwen2.5-0.5B shape's optimizer step from 0.34 to 0.20 s and its step from 0.878 to 0.821 s (0.762 with
            ``EngineSettings.share_trained_weights``).
    """

    def __init__(
        self,
        frozen_dtype: DtypeName = "auto",
        compute_dtype: DtypeName = "auto",
        quantize: Quantize | None = None,
        offload_optimizer: bool | None = None,
        memory_budget: float | None = None,
        utilization: float = 0.9,
        plan: bool = True,
        adjust_micro_batch: bool = True,
        enforce_budget: bool = False,
        activation_bytes_per_token: int | None = None,
        engine_overhead_bytes: int = GiB,
        reserved_bytes: int = 256 * 1024**2,
        log_memory: bool = True,
        optimizer_states: OptimizerStates = "auto",
        step_chunk_bytes: int = 64 * MiB,
        context_bytes: int | None = None,
        master_weights: MasterWeights = "auto",
        split_large_parameters: bool = True,
        overlap_state_copies: bool = False,
        gradients_to_host: bool = True,
        step_on_host: bool | float | Literal["auto"] | None = None,
    ) -> None:
        for name, value in (("frozen_dtype", frozen_dtype), ("compute_dtype", compute_dtype)):
            if value != "auto" and value not in DTYPES:
                raise ValueError(f"{name} must be 'auto' or one of {sorted(DTYPES)}, got {value!r}")
        if compute_dtype == "float32":
            raise ValueError("compute_dtype='float32' saves nothing; use 'bfloat16' or 'float16' (or 'auto')")
        if quantize not in (None, "int8", "nf4"):
            raise ValueError(f"quantize must be None, 'int8' or 'nf4', got {quantize!r}")
        if quantize is not None:
            require_bitsandbytes()
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 (bytes, or a fraction <= 1), got {memory_budget}")
        if not 0 < utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization}")
        if optimizer_states not in ("auto", "device", "cpu"):
            raise ValueError(f"optimizer_states must be 'auto', 'device' or 'cpu', got {optimizer_states!r}")
        if step_chunk_bytes <= 0:
            raise ValueError(f"step_chunk_bytes must be > 0, got {step_chunk_bytes}")
        if master_weights not in ("auto", "device", "cpu"):
            raise ValueError(f"master_weights must be 'auto', 'device' or 'cpu', got {master_weights!r}")
        if master_weights == "cpu" and optimizer_states == "device":
            raise ValueError("master_weights='cpu' streams the fp32 masters through the optimizer step with the "
                             "optimizer states, which optimizer_states='device' keeps on the device: use "
                             "optimizer_states='auto' or 'cpu', or master_weights='device'")
        self.step_on_host_asked = step_on_host is not None  # None: "auto" where it has something to step, quietly
        stepped_on_host = host_step_setting("auto" if step_on_host is None else step_on_host,
                                            "MemoryAwarePrecision(step_on_host=...)")
        if stepped_on_host:
            inert = [why for why, off in (("master_weights='device' (no host masters)", master_weights == "device"),
                                          ("optimizer_states='device'", optimizer_states == "device"),
                                          ("gradients_to_host=False", not gradients_to_host)) if off]
            if inert and not self.step_on_host_asked:
                stepped_on_host = False
            elif inert:
                raise ValueError(f"step_on_host={step_on_host!r} steps host masters whose gradients the backward sent "
                                 f"to host memory, which {' and '.join(inert)} rule out: it would step nothing. Drop "
                                 "step_on_host, or leave master_weights, optimizer_states and gradients_to_host at "
                                 "their defaults")
        if context_bytes is not None and context_bytes < 0:
            raise ValueError(f"context_bytes must be >= 0 (or None to measure it), got {context_bytes}")
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        auto = compute_dtype == "auto"
        self.compute_dtype = default_compute_dtype(self.device_type) if auto else DTYPES[compute_dtype]
        self.frozen_dtype = self.compute_dtype if frozen_dtype == "auto" else DTYPES[frozen_dtype]
        self.precision = "bf16-mixed" if self.compute_dtype == torch.bfloat16 else "16-mixed"
        self.quantize = quantize
        self.offload_optimizer = offload_optimizer
        self.memory_budget = memory_budget
        self.utilization = utilization
        self.plan = plan
        self.adjust_micro_batch = adjust_micro_batch
        self.enforce_budget = enforce_budget
        self.activation_bytes_per_token = activation_bytes_per_token
        self.engine_overhead_bytes = engine_overhead_bytes
        self.reserved_bytes = reserved_bytes
        self.log_memory = log_memory
        self.optimizer_states = optimizer_states
        self.step_chunk_bytes = int(step_chunk_bytes)
        self.split_large_parameters = bool(split_large_parameters)
        self.overlap_state_copies = bool(overlap_state_copies)
        self.context_bytes = context_bytes
        self.master_weights = master_weights
        self.gradients_to_host = bool(gradients_to_host)
        self.step_on_host = stepped_on_host
        self._masters: HostMasterWeights | None = None
        self._host_grads: HostGradients | None = None  # the masters' gradients, sent to host memory by the backward
        self._shrunk_states = False  # set by shrink_beside_engine, undone by engine_leaves_the_update
        self._shrunk_checkpoints = False
        self._shrunk_masters = False  # master_weights="auto" moved the masters to the host beside the engine
        self._shrunk_gradients = False  # fp32 parameters' gradients sent to host memory beside the engine
        self.resolved_master_weights: Literal["device", "cpu"] = "device"  # where the last fit kept its masters
        self._streamer = self._new_streamer() if optimizer_states == "cpu" else None
        self.memory_plan: MemoryPlan | None = None
        self.planned_micro_batch_size: int | None = None
        self.memory_stats: dict[str, dict[str, int]] = {}
        self.cache_clears = 0
        self._last_grad_mode: bool | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._offloader = OptimizerOffloader()
        self._offload_needed = False  # offload_optimizer=None: set when the plan fits only with offloading
        self._kv_waves = False  # set when the plan fits only with the rollout generated in waves
        self._optimizers: list[Optimizer] = []
        self._module: L.LightningModule | None = None
        self._rollout: RolloutMemoryProvider | None = None
        if self.compute_dtype == torch.float16:
            warnings.warn("MemoryAwarePrecision computes in fp16 on this device (no bf16): there is no loss "
                          "scaling, so very small gradients may underflow; prefer a GPU with bf16", stacklevel=2)

    # ----------------------------------------------------------------------------- conversion
    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Frozen floating parameters to ``frozen_dtype`` (or 8/4 bits), trainable ones to fp32 masters."""
        module = super().convert_module(module)
        shape = training_shape_of(module)
        targets = [module, *(shape.extra_frozen if shape is not None else ())]
        for m in targets:
            if self.quantize is not None:
                quantize_frozen_linears(m, self.quantize, self.compute_dtype)
            store_for_training(m, self.frozen_dtype)
            self._register_cache_hooks(m)
        return module

    def convert_before_sharding(self, module: nn.Module) -> None:
        """Store ``module``'s weights as :meth:`convert_module` would, before FSDP2 shards them.

        Under ``ModelParallelStrategy`` the lightning-rl modules shard their models in ``configure_model``,
        before the strategy calls :meth:`convert_module`; FSDP2 records each parameter's dtype when it
        shards, so the frozen weights go to ``frozen_dtype`` here first.

        Raises:
            ValueError: ``quantize`` is set (8/4-bit frozen weights are not sharded by FSDP2 here).
        """
        if self.quantize is not None:
            raise ValueError(f"MemoryAwarePrecision(quantize={self.quantize!r}) cannot be combined with "
                             "ModelParallelStrategy (FSDP2 does not shard bitsandbytes weights here): use "
                             "quantize=None, or strategy='ddp' to keep quantized frozen weights")
        store_for_training(module, self.frozen_dtype)

    # ----------------------------------------------------------------------------- autocast
    def _register_cache_hooks(self, module: nn.Module) -> None:
        for m in module.modules():
            if any(True for _ in m.parameters(recurse=False)):
                self._hooks.append(m.register_forward_pre_hook(self._on_forward))

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        mode = torch.is_grad_enabled()
        if mode != self._last_grad_mode:
            if self._last_grad_mode is not None:
                self.clear_autocast_cache()
            self._last_grad_mode = mode

    def clear_autocast_cache(self) -> None:
        """Drop autocast's cached low-precision copies of fp32 weights.

        A cast cached under ``no_grad`` has no autograd history; reused in a grad-enabled forward it
        would silently cut the weights out of the backward (the bug Lightning's MixedPrecision avoids).
        """
        torch.clear_autocast_cache()
        self.cache_clears += 1

    def autocast_context_manager(self) -> torch.autocast:
        """Autocast on the training device in the compute dtype."""
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Run the step under autocast; the cache is cleared when the grad mode changes and at the end."""
        self._last_grad_mode = None
        with self.autocast_context_manager():
            yield

    @override
    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        """With ``optimizer_states="cpu"``, first send states a checkpoint load put on the device back to the CPU."""
        self.offload_optimizer_states()
        with self.forward_context():
            yield

    @override
    def post_backward(self, tensor: torch.Tensor, module: L.LightningModule) -> torch.Tensor:  # type: ignore[override]
        """Free the autocast cache once its casts have served their backward."""
        self.clear_autocast_cache()
        return super().post_backward(tensor, module)

    # ----------------------------------------------------------------------------- setup
    @override
    def connect(self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]):
        """Remember the optimizers, find the device, make the memory plan and apply it."""
        model, optimizers, lr_schedulers = super().connect(model, optimizers, lr_schedulers)
        self._optimizers = list(optimizers)
        self._module = _lightning_module(model)
        device = next((p.device for p in model.parameters()), torch.device(self.device_type))
        self.device_type = device.type
        self.resolved_master_weights = "device"
        if self.master_weights == "cpu":
            self._attach_host_masters(self._module, device)
        if self._streamer is not None:
            for opt in self._optimizers:
                check_streamable(opt)
                warn_unless_per_parameter(opt)
            self.offload_optimizer_states()  # states an earlier fit left on the device
        if self.quantize is not None and device.type != "cuda":
            raise RuntimeError(f"MemoryAwarePrecision(quantize={self.quantize!r}) needs a CUDA device (bitsandbytes); "
                               f"the model is on {device}. Use quantize=None on this machine.")
        if self.plan and self._module is not None:
            self.shrink_beside_engine(self._module, self._optimizers, device)
            self.memory_plan = self.plan_with_auto_offload(self._module, self._optimizers, device)
            if self.memory_plan is not None:
                log.info("%s", self.memory_plan.summary())
                self._apply_plan(self._module)
        if self.enforce_budget and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            outside = (self.memory_plan.train_parts.get(CONTEXT_PART, 0) if self.memory_plan is not None
                       else context_bytes_for(device, self.context_bytes))
            torch_share = self._budget(total) - outside
            torch.cuda.set_per_process_memory_fraction(min(1.0, max(torch_share, 0) / total), device)
        if self.step_on_host and self.step_on_host_asked and (self._masters is None or self._host_grads is None):
            log.warning("MemoryAwarePrecision(step_on_host=%r) steps nothing in this fit: it steps host masters whose "
                        "gradients the backward sends to host memory, and here %s", self.step_on_host,
                        "the masters stay on the device" if self._masters is None else
                        f"the gradients stay with their parameters (training on {device.type})")
        if self._module is not None and self._streamer is not None:  # a resumed fit's states load into host memory
            self._load_optimizers_on_host(self._module._trainer)
        if self.log_memory and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return model, optimizers, lr_schedulers

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        """Clip by the norm of all gradients; with host masters the fp32 gradients take the factor at the step, and
        gradients waiting in host memory take it as they come back.

        The norm is computed in fp32 over each gradient, as for fp32 gradients, so the factor is the one the
        fp32-master path computes; the compute-dtype gradients of host-master weights are multiplied after
        their upcast in the step instead of being rounded here.
        """
        masters = self._masters if self._masters is not None and len(self._masters) else None
        if masters is None and self._host_grads is None:
            return super().clip_grad_by_norm(optimizer, clip_val)
        grads = [(p, p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        held = None if self._host_grads is None else self._host_grads.squares()
        if not grads and held is None:
            return None
        norms = tensor_norms([grad for _, grad in grads])  # in fp32, as for fp32 gradients
        if held is not None:  # the gradients the backward sent to host memory, measured before they left
            norms.append(held.sqrt())
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        factor = torch.clamp(float(clip_val) / (total + 1e-6), max=1.0)
        for p, grad in grads:
            if masters is None or not masters.manages(p):
                grad.mul_(factor.to(grad.device))
        if masters is not None:
            masters.grad_scale = factor
        if self._host_grads is not None:  # held gradients of parameters without host masters: scaled as they return
            self._host_grads.grad_scale = factor
        return None

    # ----------------------------------------------------------------------------- rollout toggling
    def offload_for_rollout(self) -> int:
        """Make room for the engine before it wakes between updates. Returns the bytes moved to CPU memory.

        Optimizer states (and gradients) go to pinned CPU memory when offloading is on, and the blocks
        PyTorch still caches from the update (its activations) go back to the driver: the engine maps its
        KV cache outside PyTorch's allocator, so cached blocks would otherwise sit beside it, where the memory
        plan counts none.
        """
        self._record("train_end")
        moved = self.offload_optimizer_states()  # with optimizer_states="cpu": usually nothing left to move
        if self.offload_enabled and self._optimizers and not self._offloader.is_offloaded:
            moved += self._offloader.offload(self._optimizers, source=self.device_type)
        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._reset_peak()
        return moved

    def restore_after_rollout(self) -> int:
        """Bring the offloaded states back (after the engine sleeps). Returns bytes."""
        moved = self._offloader.restore() if self._offloader.is_offloaded else 0
        self._record("rollout")
        self._reset_peak()
        return moved

    # ----------------------------------------------------------------------------- memory figures
    def _reset_peak(self) -> None:
        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _record(self, phase: str) -> None:
        if not self.log_memory:
            return
        figures = memory_figures(self.device_type)
        if not figures:
            return
        self.memory_stats[phase] = figures
        module = self._module
        if module is None or module._trainer is None:
            return
        values = {f"memory/{phase}_{k}_gib": v / GiB for k, v in figures.items()}
        try:
            module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        except Exception as err:  # noqa: BLE001 - logging is best effort outside the hooks that allow it
            log.debug("memory figures not logged: %s", err)

    @override
    def optimizer_step(self, optimizer: Any, model: L.LightningModule, closure: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Step (streaming the states chunk by chunk with ``optimizer_states="cpu"``), then record the memory figures.

        In the streamed mode the closure (the backward in automatic optimization, nothing in manual
        optimization), the ``on_before_optimizer_step`` hooks and gradient clipping all run first, so
        every gradient is final before the first chunk steps.
        """
        if self._streamer is None:
            out = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        else:
            out = self._wrap_closure(model, optimizer, closure)
            self._streamer.step(optimizer, step_fn=lambda: optimizer.step(**kwargs))
        self._record("train")
        return out

    # ----------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Dtypes, the plan, the applied micro-batch size (so a resumed run micro-batches alike) and the host step's
        balanced share of the CPU (``step_on_host="auto"``), so that a resumed run steps the same weights there.
        """
        return {
            "version": 1,
            "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "micro_batch_size": self.planned_micro_batch_size,
            "plan": None if self.memory_plan is None else self.memory_plan.to_dict(),
            "memory_stats": {k: dict(v) for k, v in self.memory_stats.items()},
            "host_share": None if self._streamer is None or self._streamer.host_step != "auto" else
            self._streamer.host_share,
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the plan, the micro-batch size and the host step's share; warn when the dtypes differ."""
        if not state_dict:
            return
        for key in ("frozen_dtype", "compute_dtype", "quantize"):
            now = self.state_dict()[key]
            if key in state_dict and state_dict[key] != now:
                warnings.warn(f"the checkpoint was trained with {key}={state_dict[key]!r}, this run uses {now!r}",
                              stacklevel=2)
        plan = state_dict.get("plan")
        if plan is not None and self.memory_plan is None:  # no plan made for this fit: the saving run's applies
            self.memory_plan = MemoryPlan.from_dict(plan)
            shape = training_shape_of(self._module)
            if shape is not None and shape.micro_batch_size is None:  # its token budget, as _apply_plan gave it
                self._module.apply_micro_batch_plan(self.memory_plan.micro_batch_tokens)
        self.memory_stats = {k: dict(v) for k, v in (state_dict.get("memory_stats") or {}).items()}
        share = state_dict.get("host_share")
        if isinstance(share, float) and self._streamer is not None and self._streamer.host_step == "auto":
            self._streamer.host_share = share  # the CPU's balanced share of the host step, where it had moved
        mbs = state_dict.get("micro_batch_size")
        if isinstance(mbs, int):
            self.planned_micro_batch_size = mbs
            shape = training_shape_of(self._module)
            if shape is not None and self.adjust_micro_batch and shape.micro_batch_size is not None:
                self._module.apply_micro_batch_plan(mbs * shape.sequence_tokens)  # at most mbs sequences

    @override
    def teardown(self) -> None:
        """Bring offloaded states back, remove the hooks and forget the registered rollout engine."""
        self._rollout = None
        if self._offloader.is_offloaded:
            self._offloader.restore()
        self._offloader.release_buffers()
        if self._streamer is not None:
            self._streamer.clear()
        self._restore_optimizer_load()
        self._shrunk_masters = self._shrunk_gradients = False
        self._detach_masters()  # the module keeps fp32 weights on its device after the fit (held gradients back)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        super().teardown()


__all__ = ["MemoryAwarePrecision", "default_compute_dtype", "device_used_bytes", "memory_figures",
           "require_bitsandbytes"]
