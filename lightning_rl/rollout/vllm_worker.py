"""Runs inside a vLLM engine process: reads the trainer's weights through CUDA IPC handles.

:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine` names :class:`PolicyWeightReceiver` as vLLM's
``worker_extension_cls``; vLLM mixes it into its GPU worker, and the trainer calls its methods with
``LLM.collective_rpc``. The handles are opened once (:meth:`~PolicyWeightReceiver.lightning_rl_attach`): the
worker then holds views of the trainer's own parameter memory, and each sync
(:meth:`~PolicyWeightReceiver.lightning_rl_load`) copies them into the engine's weights on the device, casting
to the engine's dtype on the way, with no copy in the trainer's process. A LoRA policy's adapter products are added
to their base weights on the way (:func:`~lightning_rl.rollout.engine_weights.merged_weight`), one weight at a time.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_rl.rollout.engine_streams import install_in_launched_engine, streams_made


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exit_when_gone(
    pid: int, interval_s: float = 1.0, exit_process: Callable[[int], Any] = os._exit
) -> threading.Thread:
    """Start a daemon thread that ends this process once process ``pid`` is gone.

    The engine process watches the trainer: a trainer killed outright (SIGKILL, out of host memory) cannot stop
    its engine, which would otherwise keep its GPU memory.
    """

    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval_s)
        exit_process(1)

    thread = threading.Thread(target=watch, name="lightning-rl-trainer-watch", daemon=True)
    thread.start()
    return thread


class PolicyWeightReceiver:
    """Methods vLLM adds to its worker (``self`` is the worker; ``self.model_runner`` holds the model)."""

    model_runner: Any

    def lightning_rl_attach(self, handles: bytes, trainer_pid: int | None = None) -> int:
        """Open the trainer's tensors (:func:`~lightning_rl.rollout.vllm_process.ipc_handles`).

        With ``trainer_pid`` this process also ends itself once the trainer is gone (:func:`exit_when_gone`).

        Returns:
            The number of tensors opened.
        """
        from lightning_rl.rollout.engine_weights import LoRAProduct

        def open_tensor(handle: tuple[Any, Any]) -> torch.Tensor:
            rebuild, args = handle
            return rebuild(*args)

        opened = [(name, open_tensor(base),
                   tuple(LoRAProduct(open_tensor(a), open_tensor(b), scale) for a, b, scale in products))
                  for name, base, products in pickle.loads(handles)]
        self._lightning_rl_weights = opened
        if trainer_pid is not None and getattr(self, "_lightning_rl_watch", None) is None:
            self._lightning_rl_watch = exit_when_gone(trainer_pid)
        return len(opened)

    @torch.no_grad()
    def lightning_rl_load(self) -> int:
        """Copy the attached tensors into the engine's model, LoRA products merged in, one weight at a time.

        The trainer waits, idle, until this returns.

        Returns:
            The number of tensors loaded.
        """
        weights = getattr(self, "_lightning_rl_weights", None)
        if weights is None:
            raise RuntimeError("lightning_rl_load before lightning_rl_attach: the trainer sent no weight handles")
        from lightning_rl.rollout.engine_weights import merged_weight

        model = self.model_runner.get_model()
        model.load_weights((name, merged_weight(base, products)) for name, base, products in weights)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the trainer may write its parameters as soon as this returns
        return len(weights)

    @torch.no_grad()
    def lightning_rl_share_base(self) -> bytes:
        """Load the attached base weights unmerged, drop the views of them, and hand out the engine's weights.

        After this the trainer points its frozen LoRA base at the engine's weights
        (:mod:`~lightning_rl.rollout.merged_base`), frees its own copy, and merges the adapters into them itself at
        each sync; this process holds no view of the trainer's memory any more (a later load needs a new attach).

        Returns:
            Pickled ``{"packed": packed_modules_mapping, "params": [(name, CUDA IPC handle), ...]}``.
        """
        weights = getattr(self, "_lightning_rl_weights", None)
        if weights is None:
            raise RuntimeError("lightning_rl_share_base before lightning_rl_attach: the trainer sent no weight handles")
        model = self.model_runner.get_model()
        model.load_weights((name, base) for name, base, _ in weights)  # the pristine base, as the trainer holds it
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._lightning_rl_weights = None  # the trainer frees its base next
        return self.lightning_rl_engine_parameters()

    def lightning_rl_engine_parameters(self) -> bytes:
        """Hand out the engine's weights, unchanged: the trainer points its trained weights at them
        (:mod:`~lightning_rl.rollout.shared_trained_weights`).

        Returns:
            Pickled ``{"packed": packed_modules_mapping, "params": [(name, CUDA IPC handle), ...]}``.
        """
        from torch.multiprocessing.reductions import reduce_tensor

        model = self.model_runner.get_model()
        packed = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
        params = [(name, reduce_tensor(p.detach())) for name, p in model.named_parameters()]
        return pickle.dumps({"packed": packed, "params": params})

    def lightning_rl_memory(self) -> dict[str, int]:
        """The engine process's device memory by kind, in bytes: PyTorch's allocator and vLLM's sleep-mode pools by tag.

        ``torch_*`` come from PyTorch's caching allocator; ``cumem_<tag>`` (``weights``, ``kv_cache``) is what
        vLLM's sleep-mode allocator has mapped now; ``cuda_stack_limit`` the context's per-thread stack limit (its
        local-memory reservation scales with it); ``streams_from_driver`` and ``streams_from_pool`` count the new
        streams this process made (:mod:`~lightning_rl.rollout.engine_streams`). The rest of the process's NVML
        figure is the CUDA context and the libraries' own allocations. Empty on a machine without CUDA.
        """
        if not torch.cuda.is_available():
            return {}
        out = {"torch_allocated": torch.cuda.memory_allocated(), "torch_reserved": torch.cuda.memory_reserved(),
               "torch_max_reserved": torch.cuda.max_memory_reserved()}
        from lightning_rl.rollout.vllm_internals import mapped_pool_bytes

        out.update({f"cumem_{tag}": n for tag, n in mapped_pool_bytes().items()})
        out.update({f"streams_from_{kind}": n for kind, n in streams_made().items()})
        from lightning_rl.cuda_limits import stack_limit

        torch.cuda.synchronize()  # makes the context current on this thread for the driver call
        limit = stack_limit()
        if limit is not None:
            out["cuda_stack_limit"] = limit
        return out

    def lightning_rl_process(self) -> dict[str, Any]:
        """The engine process's id and the CUDA MPS client priority its CUDA context read (None where unset).

        Read in the process itself: vLLM forks the engine core from the front-end process after the front end set the
        engine's priority in its own environment, and ``/proc/PID/environ`` of a forked process still shows the
        front end's starting environment (the trainer's priority).
        """
        from lightning_rl.rollout.cuda_mps import PRIORITY_ENV

        return {"pid": os.getpid(), "mps_client_priority": os.environ.get(PRIORITY_ENV)}

    def lightning_rl_release_cache(self) -> int:
        """Give PyTorch's cached but unused device memory back to the driver. Returns the bytes released.

        vLLM's start (a profiling run, the CUDA graphs' capture) may leave blocks cached that generation does not
        need again; a process that keeps its memory beside training holds them for nothing. Graph pools in use
        stay. 0 on a machine without CUDA.
        """
        if not torch.cuda.is_available():
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        return before - torch.cuda.memory_reserved()

    def lightning_rl_detach(self) -> None:
        """Drop the views of the trainer's memory (before the trainer frees or moves it)."""
        self._lightning_rl_weights = None
        torch.cuda.empty_cache()


#: The qualified name vLLM imports in its engine process.
WORKER_EXTENSION = f"{PolicyWeightReceiver.__module__}.{PolicyWeightReceiver.__qualname__}"

# vLLM imports this module in the engine process as it resolves WORKER_EXTENSION, before it builds the worker that
# makes its CUDA streams: an engine process the library launched makes them with the driver (.engine_streams)
install_in_launched_engine()

__all__ = ["WORKER_EXTENSION", "PolicyWeightReceiver", "exit_when_gone", "process_alive"]
