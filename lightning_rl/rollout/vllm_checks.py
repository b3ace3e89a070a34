"""Checks that refuse what the vLLM engine cannot run, early and saying what to do instead."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from lightning_rl.prompting import PromptTooLongError


class UnsupportedArchitectureError(ValueError):
    """vLLM has no implementation of the policy's architecture."""


def require_cuda() -> None:
    """Raise a clear error when no CUDA device is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "The vLLM rollout engine needs a CUDA GPU, and none is visible (torch.cuda.is_available() is "
            "False). Run on a GPU machine, or drop the VLLMRollout callback to generate with transformers "
            "(the module's default engine, which also runs on a CPU)."
        )


def check_eos_ids(eos_token_ids: Sequence[int], engine: str) -> None:
    """Raise a clear error when an engine gets no EOS token id (it could not tell where completions end)."""
    if not eos_token_ids:
        raise ValueError(f"{engine} needs at least one EOS token id to know where completions end")


def check_architecture(architecture: str, supported: Collection[str], model_impl: str | None = None) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless vLLM implements ``architecture``."""
    if model_impl == "transformers" or architecture in supported:
        return
    raise UnsupportedArchitectureError(
        f"vLLM has no implementation of the architecture {architecture!r}. Use a model vLLM supports "
        "(https://docs.vllm.ai/en/latest/models/supported_models.html), try vLLM's transformers backend with "
        "EngineSettings(engine_kwargs={'model_impl': 'transformers'}), or drop the VLLMRollout callback to "
        "generate with transformers."
    )


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], max_model_len: int) -> None:
    """Raise :class:`PromptTooLongError` for a prompt that leaves no room for a completion token."""
    for i, p in enumerate(prompt_ids):
        if len(p) >= max_model_len:
            raise PromptTooLongError(
                f"prompt {i} has {len(p)} tokens, but the vLLM engine's max_model_len is {max_model_len} "
                "(prompt + completion). Raise it with VLLMRollout(max_model_len=...), or lower the module's "
                "max_prompt_length (with truncate_prompts=True to cut long prompts)."
            )


__all__ = [
    "UnsupportedArchitectureError",
    "check_architecture",
    "check_eos_ids",
    "check_prompt_lengths",
    "require_cuda",
]
