"""The one file that reaches into vLLM's private internals, for the vLLM versions it was written against.

vLLM has no public API for what a colocated trainer needs: the in-process model runner (to load weights from
memory), its LoRA manager (to install an adapter from tensors), and its CuMem allocator (to release the KV cache
while the weights stay). These move between vLLM releases, so everything that touches them lives here, behind
:data:`SUPPORTED_VLLM`; :func:`require_supported_vllm` refuses other versions with an error naming the range.

This file is also the one place that changes process state for vLLM (:meth:`VLLMInternals.start`): it sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine must live in this process, where its model can be reached; or 1
while :meth:`VLLMInternals.start_in_own_process` starts an engine in a child process), the
``RANK``/``LOCAL_RANK`` variables vLLM's external launcher reads under DDP/FSDP, and marks that an engine was
started (vLLM's sleep-mode allocator serves one engine per process). Under ``torch.distributed`` the engine runs
in vLLM's ``external_launcher`` mode (one engine per trainer process, joining the trainer's process group), and
:meth:`VLLMInternals.shutdown` leaves that group alone.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

log = logging.getLogger(__name__)

#: vLLM versions whose internals this file was written against.
SUPPORTED_VLLM = ">=0.26,<0.32"
_VLLM_AVAILABLE = RequirementCache("vllm")
_LORA_ID = 1
_LORA_NAME = "lightning-rl-policy"
_LORA_PATH = "in-memory://lightning-rl-policy"  # never read: the adapter is installed from tensors
_ENGINE_STARTED_IN_PROCESS = False  # vLLM's sleep-mode allocator serves one engine per process


def require_vllm() -> None:
    """Raise a clear error when vllm is not installed."""
    if not _VLLM_AVAILABLE:
        raise ModuleNotFoundError(
            "The vLLM rollout engine needs the 'vllm' package, which is not installed. Install it with "
            "pip install 'lightning-rl[vllm]', or drop the VLLMRollout callback to generate with "
            "transformers (the module's default engine)."
        )


def check_vllm_version(version: str) -> None:
    """Raise ``RuntimeError`` naming :data:`SUPPORTED_VLLM` when ``version`` is outside it."""
    if not SpecifierSet(SUPPORTED_VLLM).contains(Version(version), prereleases=True):
        raise RuntimeError(
            f"lightning-rl's vLLM engine supports vllm{SUPPORTED_VLLM}, and vllm {version} is installed: the engine "
            "loads weights, adapters and KV-cache memory through vLLM internals that change between releases. "
            f"Install a supported version (pip install 'vllm{SUPPORTED_VLLM}'), or drop the VLLMRollout callback to "
            "generate with transformers."
        )


def require_supported_vllm() -> None:
    """:func:`check_vllm_version` for the installed vllm."""
    check_vllm_version(importlib.metadata.version("vllm"))


def release_kv_cache() -> int:
    """Unmap the engine's KV-cache memory (its contents are discarded), keeping the weights resident.

    Returns:
        Bytes released.
    """
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # no kernel may still write into the KV cache
    freed = 0
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
            freed += data.handle[1]
    return freed


def mapped_pool_bytes() -> dict[str, int]:
    """Bytes vLLM's sleep-mode allocator has mapped now, by tag (``weights``, ``kv_cache``); empty without it."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError:
        return {}
    out: dict[str, int] = {}
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        out[data.tag] = out.get(data.tag, 0) + (0 if data.is_asleep else int(data.handle[1]))
    return out


def restore_kv_cache(runner: Any) -> None:
    """Map fresh memory at the KV cache's addresses again (CUDA graphs stay valid) and re-initialise it."""
    from vllm.device_allocator.cumem import CuMemAllocator, create_and_map

    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache" and data.is_asleep:
            create_and_map(data.handle)
            data.is_asleep = False
    post = getattr(runner, "post_kv_cache_wake_up", None)
    if post is not None:
        post()


@contextlib.contextmanager
def unwrapped_lora_layers(model: nn.Module) -> Iterator[None]:
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


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then put the old values back."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """While inside, a spawned child process does not import the parent's ``__main__`` module.

    vLLM starts its engine process with ``spawn`` once CUDA is initialised, and ``spawn`` runs the parent's main
    script again in the child (as ``__mp_main__``): a training script without an ``if __name__ == "__main__":``
    guard would train again there. vLLM's engine process needs nothing from ``__main__``.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            if "__spec__" in saved:
                main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def fp32_head(config: Any) -> None:
    """Ask vLLM for an LM head with fp32 output (read by its ``LogitsProcessor`` from the model config)."""
    config.head_dtype = "float32"


class VLLMInternals:
    """A running in-process ``vllm.LLM`` and the private parts of it the engine uses.

    Args:
        llm: the engine (``vllm.LLM`` started with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
        dist_was_initialized: ``torch.distributed`` was initialised before vLLM started (then
            :meth:`shutdown` leaves it initialised).
    """

    def __init__(self, llm: Any, dist_was_initialized: bool = True) -> None:
        self.llm = llm
        self.dist_was_initialized = dist_was_initialized
        self._lora_model: Any = None

    @classmethod
    def start(cls, kwargs: Mapping[str, Any], launcher_env: Mapping[str, str] | None = None) -> VLLMInternals:
        """Start ``vllm.LLM(**kwargs)`` in this process (see the module docstring for what this changes).

        Args:
            kwargs: the ``vllm.LLM`` arguments.
            launcher_env: for ``distributed_executor_backend="external_launcher"``, the ``RANK`` and ``LOCAL_RANK``
                (the CUDA device) vLLM's executor reads from the environment; they are set while vLLM starts (and
                put back after: Lightning reads ``LOCAL_RANK`` as its own local rank).
                vLLM then joins the ``torch.distributed`` world the trainer initialised instead of making one.

        Raises:
            RuntimeError: an engine was already started in this process.
        """
        global _ENGINE_STARTED_IN_PROCESS
        if _ENGINE_STARTED_IN_PROCESS:
            raise RuntimeError(
                "a vLLM engine with sleep mode was already started in this process, and vLLM's CuMem allocator "
                "allows only one per process (even after shutdown): keep one VLLMRollout/VLLMEngine per process, "
                "or run each fit that needs a new engine in its own process"
            )
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process
        import vllm

        _ENGINE_STARTED_IN_PROCESS = True
        with _environment(launcher_env or {}):  # Lightning reads LOCAL_RANK too: vLLM sees it only while starting
            llm = vllm.LLM(**kwargs)
        return cls(llm, dist_was_initialized=dist)

    @classmethod
    def start_in_own_process(cls, kwargs: Mapping[str, Any]) -> VLLMInternals:
        """Start ``vllm.LLM(**kwargs)`` with its engine core in a child process (vLLM's multiprocessing mode).

        The child is spawned without importing this process's ``__main__`` (:func:`main_module_hidden`). Its model
        is out of this process's reach: :attr:`runner` and the methods that use it do not apply.
        """
        import vllm

        from lightning_rl.rollout.cuda_mps import engine_process_environment
        from lightning_rl.rollout.engine_streams import launcher_environment

        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", **launcher_environment(),  # streams from the driver there
               **engine_process_environment()}  # its MPS client priority, where the trainer chose one
        with _environment(env), main_module_hidden():
            llm = vllm.LLM(**kwargs)
        return cls(llm, dist_was_initialized=False)

    @property
    def runner(self) -> Any:
        """The model runner of the engine in this process."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        except AttributeError as err:
            import vllm

            raise RuntimeError(
                "cannot reach the vLLM model in this process; the engine must run in-process "
                f"(VLLM_ENABLE_V1_MULTIPROCESSING=0), one worker per process (vllm {vllm.__version__})"
            ) from err

    def model(self) -> nn.Module:
        """The engine's model (its parameters are the engine's weights)."""
        return self.runner.get_model()

    @torch.no_grad()
    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(transformers name, tensor)`` pairs into the engine's model."""
        model = self.model()
        with unwrapped_lora_layers(model):
            model.load_weights(weights)
        torch.cuda.synchronize()

    def install_adapter(self, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Any:
        """Put a LoRA adapter's tensors into vLLM's LoRA manager under a fixed id (replacing the last ones).

        Args:
            tensors: peft checkpoint names to tensors, in the engine's dtype.
            config: the adapter's peft config as a dict.

        Returns:
            The ``LoRARequest`` to generate with it.
        """
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        manager = self.runner.lora_manager
        adapters = manager._adapter_manager
        config = {**config, "vllm_max_position_embeddings": getattr(manager, "max_position_embeddings", None)}
        helper = PEFTHelper.from_dict(config)
        helper.validate_legal(manager.lora_config)
        vmodel = adapters.model
        mapper = getattr(vmodel, "hf_to_vllm_mapper", None)
        if mapper is not None and hasattr(mapper, "get_unstacked_mapper"):
            mapper = mapper.get_unstacked_mapper()
        lora = manager._lora_model_cls.from_lora_tensors(
            lora_model_id=_LORA_ID, tensors=dict(tensors), peft_helper=helper, device="cuda",
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
        return LoRARequest(_LORA_NAME, _LORA_ID, _LORA_PATH)

    def release_kv_cache(self) -> int:
        """:func:`release_kv_cache`."""
        return release_kv_cache()

    def restore_kv_cache(self) -> None:
        """:func:`restore_kv_cache` for this engine's runner."""
        restore_kv_cache(self.runner)

    def shutdown(self) -> None:
        """Stop the engine core and vLLM's parallel state, and give the GPU memory back (idempotent).

        A process group that existed before the engine started (Lightning's, under DDP/FSDP) survives: vLLM's
        teardown may destroy the default group, which is not its own then (:func:`keep_default_group`).
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        guard = keep_default_group() if self.dist_was_initialized else contextlib.nullcontext()
        with guard:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            self._lora_model = None
            gc.collect()
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                if not self.dist_was_initialized:
                    destroy_distributed_environment()
            gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def keep_default_group() -> Iterator[None]:
    """While inside, ``torch.distributed.destroy_process_group()`` of the default group does nothing.

    Other groups (vLLM's own tensor-parallel ones) are still destroyed. On a GPU, with one process under
    Lightning's DDP and vLLM's external launcher, the default group was gone after the engine's shutdown.
    """
    real = torch.distributed.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is None or group is torch.distributed.GroupMember.WORLD:
            log.debug("kept the default process group that vLLM's teardown would destroy")
            return
        real(group)

    torch.distributed.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = real

__all__ = [
    "SUPPORTED_VLLM",
    "VLLMInternals",
    "check_vllm_version",
    "fp32_head",
    "keep_default_group",
    "main_module_hidden",
    "mapped_pool_bytes",
    "release_kv_cache",
    "require_supported_vllm",
    "require_vllm",
    "restore_kv_cache",
    "unwrapped_lora_layers",
]
