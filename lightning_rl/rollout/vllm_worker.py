"""Runs inside a vLLM engine process: reads the trainer's weights through CUDA IPC handles.

:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine` names :class:`PolicyWeightReceiver` as vLLM's
``worker_extension_cls``; vLLM mixes it into its GPU worker, and the trainer calls its methods with
``LLM.collective_rpc``. The handles are opened once (:meth:`~PolicyWeightReceiver.lightning_rl_attach`): the
worker then holds views of the trainer's own parameter memory, and each sync
(:meth:`~PolicyWeightReceiver.lightning_rl_load`) copies them into the engine's weights on the device, casting
to the engine's dtype on the way, with no copy in the trainer's process.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch


class PolicyWeightReceiver:
    """Methods vLLM adds to its worker (``self`` is the worker; ``self.model_runner`` holds the model)."""

    model_runner: Any

    def lightning_rl_attach(self, handles: bytes) -> int:
        """Open the trainer's tensors: ``handles`` is a pickled list of ``(name, rebuild function, args)``.

        Returns:
            The number of tensors opened.
        """
        opened = [(name, rebuild(*args)) for name, rebuild, args in pickle.loads(handles)]
        self._lightning_rl_weights = opened
        return len(opened)

    @torch.no_grad()
    def lightning_rl_load(self) -> int:
        """Copy the attached tensors into the engine's model (the trainer waits, idle, until this returns).

        Returns:
            The number of tensors loaded.
        """
        weights = getattr(self, "_lightning_rl_weights", None)
        if weights is None:
            raise RuntimeError("lightning_rl_load before lightning_rl_attach: the trainer sent no weight handles")
        self.model_runner.get_model().load_weights(iter(weights))
        torch.cuda.synchronize()  # the trainer may write its parameters as soon as this returns
        return len(weights)

    def lightning_rl_detach(self) -> None:
        """Drop the views of the trainer's memory (before the trainer frees or moves it)."""
        self._lightning_rl_weights = None
        torch.cuda.empty_cache()


#: The qualified name vLLM imports in its engine process.
WORKER_EXTENSION = f"{PolicyWeightReceiver.__module__}.{PolicyWeightReceiver.__qualname__}"

__all__ = ["WORKER_EXTENSION", "PolicyWeightReceiver"]
