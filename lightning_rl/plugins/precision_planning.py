"""The memory plan of :class:`~lightning_rl.plugins.precision.MemoryAwarePrecision`: made at setup, changed one
thing at a time until it fits, and applied to the module's micro-batches.

A plan that does not fit the budget is made again with, in this order: the optimizer states streamed from CPU
memory (``optimizer_states="auto"``), the rollout engine between updates instead of beside the update, the
optimizer states offloaded while the engine is awake (``offload_optimizer=None`` on CUDA), and last a KV cache
smaller than one rollout (the engine generates in waves). What a plan counts is
:func:`~lightning_rl.plugins.memory_plan.plan_memory`'s; this module decides what to try and gives the result to
the module.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer

from lightning_rl.plugins.device_context import context_bytes_for
from lightning_rl.plugins.memory_plan import (
    MemoryPlan,
    MemoryPlanError,
    ModelMemory,
    fmt_bytes,
    fsdp2_gathered_bytes_with_reference,
    optimizer_state_bytes,
    optimizer_state_bytes_of,
    stored_numel,
)
from lightning_rl.plugins.shape_plan import plan_for_shape
from lightning_rl.shapes import datamodule_batch_size, training_shape_of

if TYPE_CHECKING:
    from lightning_rl.plugins.host_gradients import HostGradients
    from lightning_rl.plugins.rollout_memory import RolloutMemoryProvider
    from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

log = logging.getLogger(__name__)


class MemoryPlanning:
    """The planning half of :class:`~lightning_rl.plugins.precision.MemoryAwarePrecision` (a mixin: it reads the
    plugin's settings and sets its plan; :class:`~lightning_rl.plugins.host_residency.HostResidency` supplies
    ``_streamable``, ``_new_streamer`` and ``offload_optimizer_states``).
    """

    # set by MemoryAwarePrecision.__init__
    compute_dtype: torch.dtype
    device_type: str
    quantize: str | None
    offload_optimizer: bool | None
    memory_budget: float | None
    utilization: float
    adjust_micro_batch: bool
    activation_bytes_per_token: int | None
    engine_overhead_bytes: int
    reserved_bytes: int
    optimizer_states: Literal["auto", "device", "cpu"]
    context_bytes: int | None
    memory_plan: MemoryPlan | None
    planned_micro_batch_size: int | None
    _streamer: StreamedOptimizerStates | None
    _host_grads: HostGradients | None
    _offload_needed: bool
    _kv_waves: bool
    _rollout: RolloutMemoryProvider | None

    def _budget(self, total: int | None) -> int | None:
        if self.memory_budget is None:
            return None if total is None else int(total * self.utilization)
        if self.memory_budget <= 1:
            return None if total is None else int(total * self.memory_budget)
        return int(self.memory_budget)

    @property
    def offload_enabled(self) -> bool:
        """Whether optimizer states leave the device while the engine is awake (see ``offload_optimizer``)."""
        if self.offload_optimizer is None:
            return self.device_type == "cuda" and self._offload_needed
        return bool(self.offload_optimizer)

    def plan_with_auto_offload(
        self, module: L.LightningModule, optimizers: list[Optimizer], device: torch.device
    ) -> MemoryPlan | None:
        """:meth:`make_plan`, first with the optimizer states on the device during rollouts.

        A plan that does not fit with the engine running beside the update (a rollout provider whose
        ``release_overlap()`` returns True) is made again with the engine between updates. With
        ``offload_optimizer=None`` on CUDA, a plan whose rollout phase does not fit is made again with
        the states offloaded while the engine is awake, and offloading is switched on. Last, when only the
        rollout's KV cache is short, the engine gets what is left and generates the rollout in waves
        (:meth:`plan_with_kv_waves`).
        """
        self._offload_needed = False
        self._kv_waves = False
        try:
            return self._plan_cheapest_first(module, optimizers, device)
        except MemoryPlanError as err:
            plan = self.plan_with_kv_waves(module, optimizers, device)
            if plan is None:
                raise err from None
            return plan

    def plan_with_kv_waves(
        self, module: L.LightningModule, optimizers: list[Optimizer], device: torch.device
    ) -> MemoryPlan | None:
        """The plan with a KV cache smaller than one rollout, or None when that does not fit either.

        The engine then holds as many whole sequences at once as the KV cache has room for and generates the
        rest as earlier ones finish: slower rollouts in the budget the user gave, with a warning that says how
        much more memory holds the rollout whole.
        """
        if self._rollout is None:
            return None
        self._kv_waves = True
        try:
            plan = self.make_plan(module, optimizers, device)
        except MemoryPlanError:
            self._kv_waves = False
            return None
        if plan is not None and plan.kv_fraction < 1 and plan.kv_cache_bytes is not None:
            short = math.ceil(plan.kv_cache_bytes / plan.kv_fraction) - plan.kv_cache_bytes
            log.warning("MemoryAwarePrecision: the KV cache (%s) holds %.0f%% of one rollout's tokens in the budget "
                        "of %s: the engine generates each rollout in waves, which is slower. About %s more "
                        "(memory_budget=%d) holds it whole.", fmt_bytes(plan.kv_cache_bytes), 100 * plan.kv_fraction,
                        fmt_bytes(plan.budget_bytes), fmt_bytes(short), plan.budget_bytes + short)
        return plan

    def _plan_cheapest_first(
        self, module: L.LightningModule, optimizers: list[Optimizer], device: torch.device
    ) -> MemoryPlan | None:
        """:meth:`make_plan`, changing one thing at a time until it fits (see :meth:`plan_with_auto_offload`)."""
        try:
            return self.make_plan(module, optimizers, device)
        except MemoryPlanError as err:
            if self._stream_states_to_fit(optimizers, device, err):
                return self._plan_cheapest_first(module, optimizers, device)
            release = getattr(self._rollout, "release_overlap", None)
            if release is not None and release():  # its engine then sleeps during the update instead
                log.warning("MemoryAwarePrecision: the rollout engine cannot run beside the update (%s); rollouts "
                            "are generated between updates instead", err)
                return self._plan_cheapest_first(module, optimizers, device)
            if self.offload_optimizer is not None or device.type != "cuda":
                raise
            self._offload_needed = True  # the rollout phase fits only with the states in CPU memory
            return self.make_plan(module, optimizers, device)

    def _stream_states_to_fit(self, optimizers: list[Optimizer], device: torch.device, err: MemoryPlanError) -> bool:
        """With ``optimizer_states="auto"``: switch to CPU-resident states when the plan does not fit without.

        Tried before the engine gives up running beside the update: streaming costs two host-device copies
        of the states per step, generating between updates costs the rollout's whole time. Returns True when
        that changed the plan (on CUDA, for optimizers with per-parameter state only).
        """
        if self.optimizer_states != "auto" or self._streamer is not None or device.type != "cuda":
            return False
        if not self._streamable(optimizers):
            return False
        log.warning("MemoryAwarePrecision: the memory plan does not fit with the optimizer states on the device (%s); "
                    "they are kept in CPU memory and streamed through each optimizer step instead "
                    "(optimizer_states='cpu'; optimizer_states='device' keeps them on the device)", err)
        self._streamer = self._new_streamer()
        self.offload_optimizer_states()
        return True

    def register_rollout(self, provider: RolloutMemoryProvider | None) -> None:
        """Plan a rollout phase for the engine ``provider`` runs beside training (None: no colocated engine).

        :class:`~lightning_rl.callbacks.VLLMRollout` registers itself at ``setup``; the plan asks it for a
        :class:`~lightning_rl.plugins.rollout_memory.RolloutMemory` once the policy exists.
        """
        self._rollout = provider

    def make_plan(self, module: L.LightningModule, optimizers: list[Optimizer],
                  device: torch.device) -> MemoryPlan | None:
        """The memory plan for ``module`` on ``device`` (None when the budget or the module's shape is unknown)."""
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        budget = self._budget(total)
        shape = training_shape_of(module)
        if budget is None or shape is None:
            log.info("MemoryAwarePrecision: no memory plan (budget %s, module shape %s)", budget, shape is not None)
            return None
        opt_bytes = sum(optimizer_state_bytes_of(o) for o in optimizers)
        if opt_bytes == 0:
            numel = sum(stored_numel(p) for o in optimizers for g in o.param_groups for p in g["params"])
            opt_bytes = optimizer_state_bytes(numel)
        opt_device = None
        if self._streamer is not None:
            opt_device = max((self._streamer.device_bytes_estimate(o, opt_bytes) for o in optimizers), default=0)
        fp32_trainable = sum(stored_numel(p) for p in module.parameters()
                             if p.requires_grad and p.dtype == torch.float32)
        modules = [module, *shape.extra_frozen]
        rollout = self._rollout.rollout_memory(shape) if self._rollout is not None and shape.generates else None
        held = self._host_grads  # gradients the backward sends to host memory stay on the device only briefly
        grad_bytes = None if held is None or not len(held) else held.device_bytes(module.parameters())
        return plan_for_shape(
            shape, ModelMemory.from_modules(modules), budget_bytes=budget,
            compute_dtype=self.compute_dtype, optimizer_bytes=opt_bytes, rollout=rollout,
            prompts_per_step=datamodule_batch_size(module._trainer), engine_overhead_bytes=self.engine_overhead_bytes,
            offload_optimizer=self.offload_enabled, optimizer_device_bytes=opt_device,
            autocast_cast_bytes=fp32_trainable * self.compute_dtype.itemsize,
            activation_bytes_per_token_override=self.activation_bytes_per_token, reserved_bytes=self.reserved_bytes,
            gathered_weight_bytes=fsdp2_gathered_bytes_with_reference([module], shape.extra_frozen),
            context_bytes=context_bytes_for(device, self.context_bytes), waves=self._kv_waves,
            grad_bytes=grad_bytes, cuda=device.type == "cuda", quantized=self.quantize is not None,
            adapters=getattr(module, "lora", None) is not None)

    def _apply_plan(self, module: nn.Module) -> None:
        """Give the module the planned micro-batch (:meth:`~lightning_rl.shapes.ShapedModule.apply_micro_batch_plan`).

        A token budget when it left ``micro_batch_size`` None (its micro-batches then follow each rollout's
        padded length), else at most the planned number of sequences (only with ``adjust_micro_batch``).
        """
        plan, shape = self.memory_plan, training_shape_of(module)
        if plan is None or shape is None:
            return
        if shape.micro_batch_size is not None:
            self.planned_micro_batch_size = min(plan.micro_batch_sequences(shape.sequence_tokens),
                                                shape.micro_batch_size)
            if not self.adjust_micro_batch:
                return
        module.apply_micro_batch_plan(plan.micro_batch_tokens)

    @property
    def kv_cache_bytes(self) -> int | None:
        """The KV-cache budget the plan gives the rollout engine (None without a plan)."""
        return None if self.memory_plan is None else self.memory_plan.kv_cache_bytes


__all__ = ["MemoryPlanning"]
