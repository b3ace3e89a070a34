"""Where the trainer's weights, gradients and optimizer states wait while a rollout engine generates beside the update.

A part of :class:`~lightning_rl.plugins.precision.MemoryAwarePrecision`, kept apart from its autocast and its plan:

* streamed optimizer states (:class:`~lightning_rl.plugins.streamed_states.StreamedOptimizerStates`): the states in
  pinned CPU memory, brought through the device chunk by chunk in the optimizer step;
* host masters (:class:`~lightning_rl.plugins.host_masters.HostMasterWeights`): the fp32 masters of the trainable
  linear weights and embeddings in host memory, the parameters in the compute dtype;
* host gradients (:class:`~lightning_rl.plugins.host_gradients.HostGradients`): each gradient sent to host memory
  as the backward produces it, back with its chunk in the step.

:meth:`HostResidency.shrink_beside_engine` picks them when an engine in its own process generates during the update
(its generation hides their copies); :meth:`HostResidency.engine_leaves_the_update` undoes what it picked when that
engine generates between updates after all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.optim import Optimizer

from lightning_rl.plugins.host_gradients import HostGradients
from lightning_rl.plugins.host_masters import (
    HostMasterWeights,
    managed_parameters,
    step_counters_beside_their_parameters,
)
from lightning_rl.plugins.host_step import host_step_refusal
from lightning_rl.plugins.memory_plan import GiB, fmt_bytes, optimizer_state_bytes, stored_numel
from lightning_rl.plugins.streamed_states import (
    StreamedOptimizerStates,
    UnsupportedOptimizerError,
    check_streamable,
    steps_per_parameter,
)
from lightning_rl.rollout.sharded_weights import is_dtensor
from lightning_rl.shapes import training_shape_of

if TYPE_CHECKING:
    from lightning_rl.plugins.rollout_memory import RolloutMemoryProvider

log = logging.getLogger(__name__)

#: ``master_weights="auto"`` keeps at most this many bytes of fp32 masters in host memory. Each step copies them
#: both ways beside the generation: on an H200 host, SmolLM2-135M's 0.4 GB cost 0.04 s of update, hidden by the
#: generation (0.57 against 0.65 s a step, 0.43 GiB less). The Qwen2.5-0.5B shape's 1.84 GiB ran faster in host
#: memory in the three latest same-call comparisons (0.941 against 1.163 s a step at 5.81 against 7.63 GiB on
#: 2026-12-04; 0.997 against 1.074 and 0.937 against 0.971 before): the update with fp32 weights on the device
#: slowed the generation beside it more than the copies cost. Larger masters are unmeasured and stay on the device.
HOST_MASTERS_AUTO_MAX_BYTES = 2 * GiB


def host_masters_refusal(module: nn.Module) -> str | None:
    """Why ``module``'s fit cannot keep fp32 masters in host memory (several processes, FSDP2 shards), else None."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        return (f"MemoryAwarePrecision(master_weights='cpu') supports one training process; this run has "
                f"{trainer.world_size}. Use master_weights='device' with several processes.")
    if any(is_dtensor(p) for p in module.parameters()):
        return ("MemoryAwarePrecision(master_weights='cpu') does not take FSDP2-sharded parameters; use "
                "master_weights='device' with ModelParallelStrategy")
    return None


def sends_gradients_to_host(device: torch.device) -> bool:
    """Whether host masters' gradients go to host memory during the backward: on CUDA (a CPU's are there already)."""
    return device.type == "cuda"


def warn_unless_per_parameter(optimizer: Optimizer) -> None:
    """Warn that streaming ``optimizer`` in chunks may change its results (not one of torch's per-parameter ones)."""
    if not steps_per_parameter(optimizer):
        warnings.warn(f"MemoryAwarePrecision streams {type(optimizer).__name__}'s states and steps its parameters in "
                      "chunks: the results match optimizer_states='device' only when its step of a parameter depends "
                      "on that parameter alone (no global gradient norm, no decay of parameters without a gradient). "
                      "Use optimizer_states='device' (and master_weights='device') if it couples parameters",
                      stacklevel=3)


class HostResidency:
    """The host-memory half of :class:`~lightning_rl.plugins.precision.MemoryAwarePrecision` (a mixin: it reads the
    plugin's settings and keeps its streamer, masters and held gradients).
    """

    # set by MemoryAwarePrecision.__init__
    compute_dtype: torch.dtype
    device_type: str
    memory_budget: float | None
    optimizer_states: Literal["auto", "device", "cpu"]
    master_weights: Literal["auto", "device", "cpu"]
    step_chunk_bytes: int
    split_large_parameters: bool
    overlap_state_copies: bool
    gradients_to_host: bool
    step_on_host: bool | float | str
    step_on_host_asked: bool
    resolved_master_weights: Literal["device", "cpu"]
    _streamer: StreamedOptimizerStates | None
    _masters: HostMasterWeights | None
    _host_grads: HostGradients | None
    _shrunk_states: bool
    _shrunk_checkpoints: bool
    _shrunk_masters: bool
    _shrunk_gradients: bool
    _optimizers: list[Optimizer]
    _module: L.LightningModule | None
    _rollout: RolloutMemoryProvider | None
    _loading_strategy: Any = None  # the strategy whose optimizer load _load_optimizers_on_host took over

    def _attach_host_masters(self, module: L.LightningModule | None, device: torch.device) -> None:
        """``master_weights="cpu"``: the trainable weights (linear, embeddings) to the compute dtype, their fp32 masters
        to the host.

        Raises:
            ValueError: several training processes, FSDP2 shards, or an optimizer that cannot stream its states.
        """
        if module is None or self._masters is not None:
            return
        refusal = host_masters_refusal(module)
        if refusal is not None:
            raise ValueError(refusal)
        for opt in self._optimizers:
            try:
                check_streamable(opt)
            except UnsupportedOptimizerError as why:
                raise UnsupportedOptimizerError(f"{why} (MemoryAwarePrecision(master_weights='cpu') steps the fp32 "
                                                "masters chunk by chunk with the states: use master_weights='device' "
                                                "with this optimizer)") from why
            if self.step_on_host and self.step_on_host_asked and (refusal := host_step_refusal(opt)) is not None:
                raise ValueError(f"MemoryAwarePrecision(step_on_host={self.step_on_host}) steps the host masters on "
                                 f"the CPU with Adam or AdamW, and {refusal}: use step_on_host=False with this "
                                 "optimizer")
        if self._streamer is None:
            self._streamer = self._new_streamer()
        self._masters = HostMasterWeights(self.compute_dtype)
        moved = self._masters.attach(module)
        self.resolved_master_weights = "cpu"
        for opt in self._optimizers:
            self._masters.watch_optimizer(opt)
        self._streamer.masters = self._masters
        log.info("MemoryAwarePrecision: %d trainable weights (linear, embeddings) stored in %s on the %s; their fp32 "
                 "masters (%s) stream with the optimizer states from host memory", len(self._masters),
                 str(self.compute_dtype).removeprefix("torch."), device.type, fmt_bytes(moved))
        if self.gradients_to_host and sends_gradients_to_host(device):  # from the backward to their chunk's step
            self._host_grads = HostGradients()
            self._host_grads.attach(self._masters.parameters())
            self._streamer.gradients = self._host_grads
        if device.type == "cuda":
            # the fp32 weights the conversion freed stay cached in segments allocated before the engine process
            # turns on expandable segments; on an H200 SmolLM2's reserve stood at 0.61 GiB for 0.27 allocated
            torch.cuda.empty_cache()

    def _stop_host_gradients(self) -> None:
        """Held gradients back on their parameters; the backward keeps gradients on the device from now on."""
        if self._host_grads is not None:
            self._host_grads.detach()
            self._host_grads = None
        if self._streamer is not None:
            self._streamer.gradients = None

    def _detach_masters(self) -> None:
        """fp32 weights back on the device, held gradients back beside them, the masters' hooks removed."""
        self._stop_host_gradients()
        if self._masters is not None:
            params = self._masters.parameters()
            self._masters.detach()
            self._masters = None
            for p in params:  # a gradient left between a backward and its step takes the weight's dtype again
                if p.grad is not None and p.grad.dtype != p.dtype:
                    p.grad = p.grad.to(p.dtype)
        if self._streamer is not None:
            self._streamer.masters = None

    @property
    def host_gradients(self) -> HostGradients | None:
        """The gradients the backward sent to host memory (``gradients_to_host`` on CUDA), else None.

        A module that computes a gradient norm or skips a step itself reads :meth:`HostGradients.squares` and calls
        :meth:`HostGradients.drop` (``PolicyModule.optimizer_step_checked`` does).
        """
        return self._host_grads

    def _new_streamer(self) -> StreamedOptimizerStates:
        return StreamedOptimizerStates(self.step_chunk_bytes, split_large=self.split_large_parameters,
                                       overlap_copies=self.overlap_state_copies, host_step=self.step_on_host)

    @property
    def host_master_weights(self) -> HostMasterWeights | None:
        """The fp32 masters kept in host memory (``master_weights="cpu"``), else None."""
        return self._masters

    def shrink_beside_engine(
        self, module: L.LightningModule, optimizers: list[Optimizer], device: torch.device
    ) -> None:
        """Make the trainer's share small when a rollout engine generates during the update (in its own process).

        That engine holds its memory through the update, and the step lasts as long as its generation, which the
        update runs beside. So with ``optimizer_states="auto"`` the optimizer states stay in CPU memory and stream
        through the step (when they are larger than one ``step_chunk_bytes`` chunk), and a module that left
        ``offload_checkpoints`` None offloads its checkpointed inputs (``offload_checkpoints_beside_engine``), and
        with ``master_weights="auto"`` streamed states carry the fp32 masters of the linear weights and embeddings (the
        parameters hold the compute dtype): their copies to and from the host come out of the generation's time.
        Measured end to end against TRL on an H200 (``bench/results/vs_trl_NOTES.md``). Only on CUDA, and only
        when the plan's rollout engine says it stays up during the update.
        """
        shape = training_shape_of(module)
        if device.type != "cuda" or self._rollout is None or shape is None or not shape.generates:
            return
        if self._rollout.rollout_memory(shape).beside_training_bytes <= 0:
            return  # no engine beside the update: the engine sleeps while training runs
        offload = getattr(module, "offload_checkpoints_beside_engine", None)
        if offload is not None and offload():
            self._shrunk_checkpoints = True
            log.info("MemoryAwarePrecision: the rollout engine generates during the update; the checkpointed layers' "
                     "inputs wait in host memory (GRPO(offload_checkpoints=False) keeps them on the device)")
        if self.optimizer_states == "auto" and self._streamer is None and self._streamable(optimizers):
            numel = sum(stored_numel(p) for o in optimizers for g in o.param_groups for p in g["params"])
            # streaming holds one chunk on the device: not worth it for states no larger than that
            if optimizer_state_bytes(numel) > self.step_chunk_bytes:
                log.info("MemoryAwarePrecision: the rollout engine generates during the update; the optimizer states "
                         "(%s) stay in CPU memory and stream through each step (optimizer_states='device' keeps "
                         "them on the device)", fmt_bytes(optimizer_state_bytes(numel)))
                self._streamer = self._new_streamer()
                self._shrunk_states = True
                self.offload_optimizer_states()
        if self.master_weights == "auto" and self._streamer is not None:
            self._host_masters_beside_engine(module, device)
        if self._streamer is not None and self._masters is None:
            self._host_gradients_beside_engine(module, optimizers, device)

    def _host_gradients_beside_engine(
        self, module: L.LightningModule, optimizers: list[Optimizer], device: torch.device
    ) -> None:
        """States streaming beside the engine with the fp32 parameters on the device: their gradients wait in host
        memory from the backward to their chunk's step.

        With ``gradients_to_host``, on CUDA, for one training process without FSDP2 shards (as host masters). The
        backward then holds no full set of fp32 gradients (1.84 GiB for the Qwen2.5-0.5B shape); each comes back
        with its chunk's states, scaled there by the clipping factor.
        """
        if self._host_grads is not None or not (self.gradients_to_host and sends_gradients_to_host(device)):
            return
        if isinstance(module, nn.Module) and host_masters_refusal(module) is not None:
            return  # several processes or FSDP2 shards
        params = [p for o in optimizers for g in o.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return
        self._host_grads = HostGradients()
        sent = self._host_grads.attach(params)
        self._streamer.gradients = self._host_grads  # type: ignore[union-attr]
        self._shrunk_gradients = True
        log.info("MemoryAwarePrecision: the rollout engine generates during the update; the gradients of %d "
                 "parameters wait in host memory from the backward to their chunk's step "
                 "(gradients_to_host=False keeps them on the device)", sent)

    def _host_masters_beside_engine(self, module: L.LightningModule, device: torch.device) -> None:
        """``master_weights="auto"`` with states streaming beside the engine: the fp32 masters stream with them.

        Only for one training process without FSDP2 shards and with weights to move, of at most
        ``HOST_MASTERS_AUTO_MAX_BYTES`` of masters; otherwise the masters stay on the device.
        """
        if self._masters is not None or not isinstance(module, nn.Module):
            return
        if host_masters_refusal(module) is not None:
            return
        nbytes = 4 * sum(p.numel() for p in managed_parameters(module))
        if not nbytes:
            return
        if nbytes > HOST_MASTERS_AUTO_MAX_BYTES:
            log.info("MemoryAwarePrecision: the fp32 masters (%s) stay on the device: their copies to and from the "
                     "host would outlast the generation beside the update (master_weights='cpu' moves them)",
                     fmt_bytes(nbytes))
            return
        self._attach_host_masters(module, device)
        self._shrunk_masters = True

    def engine_leaves_the_update(self, module: L.LightningModule | None = None) -> None:
        """The rollout engine generates between updates after all (its process failed to start): undo the shrink.

        :meth:`shrink_beside_engine` streamed the optimizer states and offloaded the checkpointed inputs so that an
        engine generating during the update would fit beside it and hide their copies. An engine between updates
        sleeps while the update runs and hides nothing, so masters that ``master_weights="auto"`` moved to the host
        come back as fp32 parameters, the states go back to the device (unless ``master_weights="cpu"`` streams
        them) and the checkpointed inputs stay there. Under a ``memory_budget`` all stay as planned.
        """
        if self.memory_budget is not None:
            return
        if self._shrunk_masters and self._masters is not None:
            self._detach_masters()  # fp32 weights back on the device (no engine process maps them now)
            log.info("MemoryAwarePrecision: the rollout engine generates between updates; the fp32 master weights "
                     "stay on the device")
            self.resolved_master_weights = "device"
        self._shrunk_masters = False
        if self._shrunk_gradients and self._masters is None:
            self._stop_host_gradients()
            log.info("MemoryAwarePrecision: the rollout engine generates between updates; the gradients stay on the "
                     "device")
        self._shrunk_gradients = False
        if self._shrunk_states and self._streamer is not None and self._masters is None:
            for opt in self._optimizers:  # states a resumed run already holds: back beside their parameters
                self._streamer.return_states(opt)
            self._streamer.clear()
            self._streamer = None
            log.info("MemoryAwarePrecision: the rollout engine generates between updates; the optimizer states stay "
                     "on the device")
        self._shrunk_states = False
        module = module if module is not None else self._module
        keep = getattr(module, "keep_checkpoints_on_device", None)
        if self._shrunk_checkpoints and keep is not None:
            keep()
        self._shrunk_checkpoints = False

    def load_streamed_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        """Load ``optimizer``'s checkpointed state with its streamed states straight into host memory.

        ``optimizer.load_state_dict`` puts each state on its parameter's device, all at once, and Lightning's
        ``Strategy.load_optimizer_state_dict`` then moves every state to the device: a resumed fit held all its
        optimizer states beside the rollout engine until its first training step, 8 bytes per AdamW parameter that
        the plan does not count (a fit that fits only with streamed states would run out of memory there). Here
        the load runs against host stand-ins for the parameters (empty CPU tensors of each one's dtype, its fp32
        master's for a host-master weight), the states go to pinned buffers, and the fused or capturable groups'
        step counters go beside their parameters.
        """
        real = [list(group["params"]) for group in optimizer.param_groups]
        stand_ins = [[torch.empty(0, dtype=self._state_dtype(p)) for p in params] for params in real]
        back = {id(s): p for ss, ps in zip(stand_ins, real, strict=True) for s, p in zip(ss, ps, strict=True)}
        for group, ss in zip(optimizer.param_groups, stand_ins, strict=True):
            group["params"] = ss
        try:
            optimizer.load_state_dict(state_dict)
        finally:  # the loaded groups and states hold the stand-ins: the parameters take their places again
            for group in optimizer.param_groups:
                group["params"] = [back.get(id(s), s) for s in group["params"]]
            loaded = list(optimizer.state.items())
            optimizer.state.clear()
            optimizer.state.update({back.get(id(s), s): state for s, state in loaded})
        step_counters_beside_their_parameters(optimizer)
        if self._streamer is not None:
            self._streamer.keep_loaded_states(optimizer)

    def _state_dtype(self, p: nn.Parameter) -> torch.dtype:
        """The dtype ``p``'s optimizer states take: its fp32 master's for a host-master weight, else its own."""
        masters = self._masters
        return masters.master(p).dtype if masters is not None and masters.manages(p) else p.dtype

    def _load_optimizers_on_host(self, trainer: Any) -> None:
        """Route ``trainer``'s optimizer load through :meth:`load_streamed_optimizer_state` while states stream.

        Only for a strategy that loads as Lightning's base ``Strategy`` does (one device, DDP); one with its own load
        (FSDP, DeepSpeed, a user's subclass) keeps it. :meth:`_restore_optimizer_load` undoes it at teardown.
        """
        strategy = getattr(trainer, "strategy", None)
        if strategy is None or type(strategy).load_optimizer_state_dict is not Strategy.load_optimizer_state_dict:
            return

        def load_optimizer_state_dict(checkpoint: Mapping[str, Any]) -> None:
            if self._streamer is None:  # an engine that left the update took the states back to the device
                Strategy.load_optimizer_state_dict(strategy, checkpoint)
                return
            for optimizer, state in zip(strategy.optimizers, checkpoint["optimizer_states"], strict=False):
                self.load_streamed_optimizer_state(optimizer, state)

        strategy.load_optimizer_state_dict = load_optimizer_state_dict
        self._loading_strategy = strategy

    def _restore_optimizer_load(self) -> None:
        strategy, self._loading_strategy = self._loading_strategy, None
        if strategy is not None:
            vars(strategy).pop("load_optimizer_state_dict", None)

    @staticmethod
    def _streamable(optimizers: list[Optimizer]) -> bool:
        """Whether these optimizers' states may stream from the CPU automatically (per-parameter state, no shards)."""
        if not optimizers:
            return False
        if any(is_dtensor(p) for o in optimizers for g in o.param_groups for p in g["params"]):
            return False  # FSDP2 shards: each rank steps its own shard; not streamed automatically
        try:
            for opt in optimizers:
                check_streamable(opt)
        except UnsupportedOptimizerError as why:
            log.info("MemoryAwarePrecision: optimizer states stay on the device: %s", why)
            return False
        other = [type(o).__name__ for o in optimizers if not steps_per_parameter(o)]
        if other:
            log.info("MemoryAwarePrecision: optimizer states stay on the device: %s is not one of torch's optimizers "
                     "whose step of a parameter depends on that parameter alone (optimizer_states='cpu' streams it "
                     "anyway)", ", ".join(other))
            return False
        return True

    @property
    def streams_optimizer_states(self) -> bool:
        """Whether the optimizer states live in CPU memory (``optimizer_states="cpu"``, or chosen by ``auto``)."""
        return self._streamer is not None

    def offload_optimizer_states(self) -> int:
        """With ``optimizer_states="cpu"``: move optimizer states found on the device to CPU memory. Returns bytes."""
        if self._streamer is None:
            return 0
        moved = sum(self._streamer.offload_states(opt) for opt in self._optimizers)
        if moved and self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return moved


__all__ = ["HOST_MASTERS_AUTO_MAX_BYTES", "HostResidency", "host_masters_refusal", "sends_gradients_to_host",
           "warn_unless_per_parameter"]
