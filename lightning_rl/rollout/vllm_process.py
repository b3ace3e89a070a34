"""A vLLM engine whose decode loop runs in a process of its own, on the trainer's GPU.

The in-process :class:`~lightning_rl.rollout.vllm.VLLMEngine` shares the trainer's Python interpreter: while it
generates, nothing else runs, and the decode loop of a small model is bound by that interpreter (vLLM's
scheduling and bookkeeping between steps), not by the GPU. Here vLLM's engine core runs in a child process
(vLLM's own multiprocessing mode), so the trainer's process is free while it generates: the rollout of the next
batch can run while the current batch trains (:class:`~lightning_rl.callbacks.VLLMRollout` with ``overlap``).

Weights travel without a copy in the trainer's process: the child opens CUDA IPC handles of the policy's
parameters once (:mod:`~lightning_rl.rollout.vllm_worker`), and each sync copies them into the engine's weights
on the device, cast to the engine's dtype. A LoRA policy's base weights and adapter matrices travel the same way;
the child merges them as it loads (:mod:`~lightning_rl.rollout.engine_weights`), so the engine generates without
LoRA kernels. The engine never sleeps: its weights and KV cache stay on the GPU.

What it takes: one training process on CUDA device 0 of its visible devices (the child's GPU), parameters that
are not sharded, and plain LoRA on linear layers if any. :func:`process_engine_unsupported_reason` says why not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_rl.rollout.engine_weights import EngineWeight, engine_weights, merge_unsupported_reason
from lightning_rl.rollout.merged_base import MergedBase, merged_base_unsupported_reason, share_merged_base
from lightning_rl.rollout.sharded_weights import is_sharded
from lightning_rl.rollout.shared_trained_weights import (
    SharedTrainedWeights,
    share_trained_weights,
    trained_weights_unsupported_reason,
)
from lightning_rl.rollout.vllm import VLLMEngine
from lightning_rl.rollout.vllm_checks import check_eos_ids, require_cuda
from lightning_rl.rollout.vllm_internals import VLLMInternals, require_supported_vllm, require_vllm
from lightning_rl.rollout.vllm_settings import EngineSettings
from lightning_rl.rollout.vllm_sizing import engine_weight_bytes, engine_weight_dtype
from lightning_rl.rollout.vllm_worker import WORKER_EXTENSION

if TYPE_CHECKING:
    from lightning_rl.plugins.host_masters import HostMasterWeights

log = logging.getLogger(__name__)


def process_engine_unsupported_reason(model: nn.Module, root: nn.Module | None = None) -> str | None:
    """Why the policy cannot feed an engine in its own process (None when it can).

    Args:
        model: the policy.
        root: the module the training strategy wrapped (its FSDP units hold the policy's shards), if any.
    """
    lora_reason = merge_unsupported_reason(model)
    if lora_reason:
        return f"the engine process cannot merge this LoRA adapter ({lora_reason})"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "several training processes (DDP/FSDP) each run an in-process engine in vLLM's external-launcher mode"
    if is_sharded(model, root):
        return "the policy's parameters are sharded"
    devices = {p.device for p in model.parameters()}
    if any(d.type != "cuda" for d in devices):
        return "the policy is not on a CUDA device"
    if any(d.index not in (0, None) for d in devices):
        return "the policy is not on CUDA device 0 of the visible devices, where the engine process would run"
    return None


def ipc_handles(weights: Sequence[EngineWeight],
                reduce: Callable[[torch.Tensor], tuple[Any, Any]] | None = None) -> bytes:
    """Pickled ``(name, base, [(a, b, scale), ...])`` with each tensor as ``(rebuild function, args)``.

    :mod:`~lightning_rl.rollout.vllm_worker` opens them in the engine process. ``reduce`` replaces CUDA IPC (tests
    on a CPU).
    """
    from torch.multiprocessing.reductions import reduce_tensor

    def handle(name: str, t: torch.Tensor) -> tuple[Any, Any]:
        if reduce is not None:
            return reduce(t)
        if not t.is_cuda:
            raise ValueError(f"weight {name!r} is on {t.device}: the engine process reads CUDA tensors only")
        return reduce_tensor(t)

    items = [(w.name, handle(w.name, w.base), [(handle(w.name, p.a), handle(w.name, p.b), p.scale)
                                               for p in w.products])
             for w in weights]
    return pickle.dumps(items)


def weights_layout(weights: Sequence[EngineWeight]) -> tuple[Any, ...]:
    """What the engine process's views depend on: each tensor's address, shape and dtype, and the LoRA scales."""
    return tuple((w.name, tuple(p.scale for p in w.products),
                  tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in w.tensors()))
                 for w in weights)


class _EngineParameters:
    """The engine process's weights as opened in the trainer: what :func:`.merged_base.share_merged_base` reads."""

    def __init__(self, packed: dict[str, list[str]], params: dict[str, torch.Tensor]) -> None:
        self.packed_modules_mapping = packed
        self._params = params

    def named_parameters(self) -> Any:
        return iter(self._params.items())


class VLLMProcessEngine(VLLMEngine):
    """A vLLM engine in a child process on the trainer's GPU, reading the policy's weights through CUDA IPC.

    Same arguments as :class:`~lightning_rl.rollout.vllm.VLLMEngine` (``settings.sleep_level`` does not apply: this
    engine never sleeps). ``settings.share_merged_base=True`` with a LoRA policy points the trainer's frozen base at
    the engine's merged weights (:mod:`~lightning_rl.rollout.merged_base`); ``settings.share_trained_weights=True``
    with a fully fine-tuned policy whose fp32 masters live in host memory (``host_masters``) points the trainer's
    16-bit trainable weights at the engine's (:mod:`~lightning_rl.rollout.shared_trained_weights`).
    ``settings.front_end="process"`` (the default) runs vLLM's front end in a process of its own as well
    (:mod:`~lightning_rl.rollout.front_end_process`).

    Raises:
        ValueError: the policy cannot feed it (:func:`process_engine_unsupported_reason`).
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
        host_masters: HostMasterWeights | None = None,
    ) -> None:
        settings = settings or EngineSettings()
        require_vllm()
        require_cuda()
        check_eos_ids(eos_token_ids, "VLLMProcessEngine")
        reason = process_engine_unsupported_reason(model, weights_root)
        if reason:
            raise ValueError(f"the vLLM engine cannot run in its own process: {reason}; use VLLMEngine")
        require_supported_vllm()
        weight_dtype = engine_weight_dtype(model, settings.dtype)
        self._bind(VLLMInternals(None), eos_token_ids, pad_token_id, max_model_len, settings, None, 0, weight_dtype)
        self.weights_root = weights_root
        self._attached: tuple[Any, ...] = ()
        self.last_sync_timings: dict[str, float] = {}  # the parts of the last sync_weights, in seconds
        self._dir = tempfile.mkdtemp(prefix="lightning-rl-vllm-")
        try:
            kwargs = self._llm_kwargs(model, max_num_seqs)
            kwargs.update(enable_sleep_mode=False, worker_extension_cls=WORKER_EXTENSION)
            kwargs.update(settings.engine_kwargs)
            t0 = time.perf_counter()
            if settings.front_end == "process":  # vLLM's front end out of the trainer's interpreter too
                from lightning_rl.rollout.front_end_process import start_in_front_end_process

                self.internals = start_in_front_end_process(kwargs)
            else:
                self.internals = VLLMInternals.start_in_own_process(kwargs)
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.startup_time = time.perf_counter() - t0
        self.llm = self.internals.llm
        self.engine_kwargs = kwargs
        self.weight_bytes = engine_weight_bytes(model, settings.dtype)
        self.merged_base = MergedBase()
        self.merged_base_freed_bytes = 0
        self.shared_weights = SharedTrainedWeights()
        self.shared_weights_freed_bytes = 0
        share_trained = settings.share_trained_weights is not False and not settings.share_merged_base
        if share_trained:  # asked before the engine process changes anything
            reason = trained_weights_unsupported_reason(model, host_masters)
            if reason and settings.share_trained_weights:
                self.shutdown()
                raise ValueError(f"share_trained_weights=True is impossible here: {reason}; use "
                                 "share_trained_weights=False")
            if reason:
                log.info("VLLMProcessEngine: the trained weights stay the trainer's own: %s", reason)
                share_trained = False
        self.sync_weights(model)
        try:
            if settings.share_merged_base:
                self._share_merged_base(model)
            elif share_trained:
                self._share_trained_weights(model, host_masters, required=bool(settings.share_trained_weights))
        except Exception:
            self.shutdown()  # the engine process ends with the failed start, and the trainer keeps its weights
            raise
        self.released_at_start_bytes = self.release_cached_memory()

    def _share_merged_base(self, model: nn.Module) -> None:
        """Point the trainer's frozen LoRA base at the engine's (merged) weights and free the trainer's copy.

        Raises:
            ValueError: the base cannot be shared (no plain LoRA adapter, another dtype, an unknown weight
                layout).
        """
        reason = merged_base_unsupported_reason(model)  # asked before the engine process changes anything
        if reason:
            raise ValueError(f"share_merged_base=True is impossible here: {reason}; use share_merged_base=False")
        engine_params = self._engine_parameters("lightning_rl_share_base")
        cuda = torch.cuda.is_available()
        allocated = torch.cuda.memory_allocated() if cuda else 0
        share, reason = share_merged_base(model, engine_params)
        if reason:
            raise ValueError(f"share_merged_base=True, but the LoRA base cannot be shared with the engine process's "
                             f"weights: {reason}; use share_merged_base=False")
        self.merged_base = share
        self.sync_weights(model)  # the adapters merged again, by this process into the shared weights
        if cuda:
            torch.cuda.ipc_collect()  # the engine process dropped its views of the trainer's base
            torch.cuda.empty_cache()
            self.merged_base_freed_bytes = allocated - torch.cuda.memory_allocated()
        log.info("VLLMProcessEngine: the LoRA base is the engine's merged weights (%.1f MiB held once)",
                 share.bytes_shared / 2**20)

    def _engine_parameters(self, method: str) -> _EngineParameters:
        """The engine process's weights, opened in this process, from RPC ``method``'s reply."""
        reply = pickle.loads(self.llm.collective_rpc(method)[0])
        return _EngineParameters(reply["packed"], {name: rebuild(*args) for name, (rebuild, args) in reply["params"]})

    def _share_trained_weights(self, model: nn.Module, masters: HostMasterWeights | None,
                               required: bool = True) -> None:
        """Point the trainer's 16-bit trainable weights at the engine's and free the trainer's copy.

        Without ``required`` weights that cannot be shared stay the trainer's own, with a warning that says why.

        Raises:
            ValueError: ``required`` and they cannot be shared (no host masters, a LoRA policy, an unknown weight
                layout).
        """
        cuda = torch.cuda.is_available()
        allocated = torch.cuda.memory_allocated() if cuda else 0
        share, reason = share_trained_weights(model, self._engine_parameters("lightning_rl_engine_parameters"),
                                              masters)
        if reason and not required:
            log.warning("VLLMProcessEngine: the policy's trained weights stay the trainer's own, beside the engine's "
                        "copy: %s", reason)
            return
        if reason:
            raise ValueError(f"share_trained_weights=True, but the policy's weights cannot be the engine process's: "
                             f"{reason}; use share_trained_weights=False")
        self.shared_weights = share
        self.sync_weights(model)  # the engine process drops its views of the trainer's copies (attached without them)
        if cuda:
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
            self.shared_weights_freed_bytes = allocated - torch.cuda.memory_allocated()
        log.info("VLLMProcessEngine: %d trained weights are the engine's own (%.1f MiB held once; their stepped "
                 "values wait in host memory for each sync)", len(share.views), share.bytes_shared / 2**20)

    def unshare_base(self) -> None:
        """Give the trainer private copies of its LoRA base or trained weights again (before the engine process ends;
        idempotent).
        """
        if self.merged_base.views:
            self.merged_base.unshare()
            self._attached = ()  # the bases moved: the next sync sends them again
        if self.shared_weights.views:
            self.shared_weights.unshare()
            self._attached = ()

    def sync_weights(self, model: nn.Module, root: nn.Module | None = None) -> None:
        """Copy the policy's current weights into the engine (the engine process reads them in place).

        Handles are sent again only when the parameters moved (another storage, shape or dtype). A LoRA policy's
        adapters are merged into the base weights by the engine process as it loads them; a base shared with the
        engine (``share_merged_base``) gets them merged by this process, into the engine's weights, with no load.
        Trained weights that are the engine's own (``share_trained_weights``) get their stepped values from host
        memory first and are not loaded.
        """
        self._check_alive()
        if self.merged_base.views:
            self._merge_shared_base()
            return
        t0 = time.perf_counter()
        weights = engine_weights(model)
        if self.shared_weights.views:
            shared = self.shared_weights.names
            weights = [w for w in weights if w.name not in shared]
            self.shared_weights.flush()  # the engine is idle: nothing generates from its weights now
        layout = weights_layout(weights)
        t1 = time.perf_counter()
        if layout != self._attached:
            self.llm.collective_rpc("lightning_rl_attach", args=(ipc_handles(weights), os.getpid()))
            self._attached = layout
        t2 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the optimizer's writes and the forwards reading a shared base are done
        t3 = time.perf_counter()
        self.llm.collective_rpc("lightning_rl_load")
        t4 = time.perf_counter()
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        t5 = time.perf_counter()
        self.state.weights_synced = True
        # where a sync's time goes (the bench records it): listing the weights (and the shared ones' copies from
        # host memory), sending new handles, waiting for the device, the engine's load (or merge), the prefix reset
        self.last_sync_timings = {"prepare_s": t1 - t0, "attach_s": t2 - t1, "device_wait_s": t3 - t2,
                                  "load_s": t4 - t3, "prefix_reset_s": t5 - t4}

    def _merge_shared_base(self) -> None:
        """A sync of a LoRA base shared with the engine: the trainer merges the adapters into the engine's weights
        itself (:meth:`~lightning_rl.rollout.merged_base.MergedBase.merge`), then resets the engine's prefix cache.
        """
        t0 = time.perf_counter()
        self.merged_base.merge()
        t1 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the engine generates from these weights next
        t2 = time.perf_counter()
        self.llm.reset_prefix_cache()
        t3 = time.perf_counter()
        self.merged_base.mark_synced()
        self.state.weights_synced = True
        self.last_sync_timings = {"prepare_s": 0.0, "attach_s": 0.0, "device_wait_s": t2 - t1, "load_s": t1 - t0,
                                  "prefix_reset_s": t3 - t2}

    @property
    def syncs_before_each_update(self) -> bool:
        """Whether every update needs a sync first: the trainer's LoRA base is the engine's merged weights, or its
        trained weights are the engine's (their stepped values wait for the sync).
        """
        return bool(self.merged_base.views or self.shared_weights.views)

    def release_cached_memory(self) -> int:
        """Give back what the engine process's allocator caches unused (its start leaves some). Returns the bytes.

        Called once the engine has started: the process keeps its memory through training, so cached blocks that
        generation does not take back would count against the run's peak.
        """
        self._check_alive()
        released = int(self.llm.collective_rpc("lightning_rl_release_cache")[0])
        if released:
            log.info("VLLMProcessEngine: the engine process gave back %.0f MiB its allocator cached unused",
                     released / 2**20)
        return released

    def memory_breakdown(self) -> dict[str, int]:
        """The engine process's device memory by kind, in bytes (``PolicyWeightReceiver.lightning_rl_memory``)."""
        self._check_alive()
        return dict(self.llm.collective_rpc("lightning_rl_memory")[0])

    def engine_process(self) -> dict[str, Any]:
        """The engine process's id and MPS client priority (``PolicyWeightReceiver.lightning_rl_process``)."""
        self._check_alive()
        return dict(self.llm.collective_rpc("lightning_rl_process")[0])

    def wake_up(self) -> None:
        """Nothing to do: the engine keeps its memory."""
        self._check_alive()

    def sleep(self, level: int | None = None) -> None:
        """Nothing to do: the engine keeps its memory (it runs beside training)."""
        self._check_alive()

    def shutdown(self) -> None:
        """Stop the engine process and give its GPU memory back (idempotent)."""
        if getattr(self, "merged_base", None) is not None:
            self.unshare_base()  # the views die with the engine process (shared trained weights too)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.collective_rpc("lightning_rl_detach")
            del llm
        internals = getattr(self, "internals", None)
        if internals is not None:
            internals.shutdown()  # stops the engine process
        self._attached = ()
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


__all__ = ["VLLMProcessEngine", "ipc_handles", "process_engine_unsupported_reason", "weights_layout"]
