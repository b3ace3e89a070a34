"""PyTorch's CUDA allocator with expandable segments, for a trainer whose rollout engine runs in its own process.

PyTorch's caching allocator keeps each ``cudaMalloc`` it made as a segment of fixed size. An update whose
activations change size from step to step (rollouts of new lengths) leaves blocks cached that no later request
fits, and the process holds that memory until it ends. With ``expandable_segments`` the allocator maps pages
into one growing virtual range instead, and those gaps mostly disappear. Measured on an H200 with the README's
GPU configuration (SmolLM2-135M full fine-tune, engine beside the update; ``bench/results/vs_trl_NOTES.md``),
with expandable segments set in ``PYTORCH_CUDA_ALLOC_CONF`` from the processes' start: the trainer process held
0.39 GiB less (4.56 against 4.96 GiB) at the same step time (0.613 against 0.609 s). Turned on when the engine
starts, as here, they leave the weights loaded before in fixed segments.

vLLM's sleep mode, which an engine in the trainer's own process uses, refuses an allocator with expandable
segments, so they are turned on only once the engine runs in a process of its own. A choice the user wrote in
``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) is left as it is, and the user's other settings there
are applied again with the switch (PyTorch can reset the options a settings string applied alone does not name).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # PyTorch reads the newer name first


def user_settings(environ: Mapping[str, str] | None = None) -> str:
    """The allocator settings the user wrote in the environment ("" when none)."""
    environ = os.environ if environ is None else environ
    return next((environ[v].strip(" ,") for v in ALLOC_CONF_VARIABLES if environ.get(v, "").strip()), "")


def user_expandable_segments(environ: Mapping[str, str] | None = None) -> bool | None:
    """The ``expandable_segments`` value in the user's allocator settings (None: not set)."""
    for item in user_settings(environ).split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            return value.strip().lower() == "true"
    return None


def with_user_settings(setting: str, environ: Mapping[str, str] | None = None) -> str:
    """``setting`` after the user's own allocator settings, which a settings string given alone can reset."""
    own = user_settings(environ)
    return f"{own},{setting}" if own else setting


def set_allocator_settings(settings: str) -> None:
    """Apply ``settings`` (``PYTORCH_CUDA_ALLOC_CONF`` syntax) to the allocator of this process from now on."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # newer torch; older: torch.cuda's
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def enable_expandable_segments(device: torch.device | str) -> bool:
    """Let the CUDA allocator of this process grow segments in place for the memory it reserves from now on.

    Memory already reserved keeps its segments. Nothing changes off CUDA, or when the user's environment names
    ``expandable_segments`` either way.

    Returns:
        Whether this call turned them on (undo with :func:`disable_expandable_segments`).
    """
    if torch.device(device).type != "cuda" or user_expandable_segments() is not None:
        return False
    try:
        set_allocator_settings(with_user_settings("expandable_segments:True"))
    except (AttributeError, RuntimeError) as err:  # an allocator backend that has no such setting
        log.warning("could not turn on expandable segments in PyTorch's CUDA allocator (%s); training goes on "
                    "with fixed segments, which may hold more memory", err)
        return False
    return True


def disable_expandable_segments() -> None:
    """Back to PyTorch's default, fixed segments, for what the process reserves from now on.

    A later engine in this process may use vLLM's sleep mode, which does not allow expandable segments.
    """
    try:
        set_allocator_settings(with_user_settings("expandable_segments:False"))
    except (AttributeError, RuntimeError) as err:
        log.warning("could not turn expandable segments off in PyTorch's CUDA allocator (%s)", err)


__all__ = ["ALLOC_CONF_VARIABLES", "disable_expandable_segments", "enable_expandable_segments",
           "set_allocator_settings", "user_expandable_segments", "user_settings", "with_user_settings"]
