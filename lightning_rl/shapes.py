"""What an RL module tells the precision plugin and the rollout callback about its training steps.

The plugin plans device memory and the callback sizes its engine from one documented object,
:class:`TrainingShape`, that the module builds (:meth:`ShapedModule.training_shape`), instead of
reading the module's attributes one by one. The plugin hands its result back through
:meth:`ShapedModule.apply_micro_batch_plan`. Nothing here imports Lightning: modules, plugins and
callbacks all depend on this file, and it on none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class TrainingShape:
    """The sizes of a module's training steps.

    Args:
        model_config: the policy's transformers config (layers, hidden size, heads, vocabulary).
        sequence_tokens: most padded tokens of one training sequence (prompt + completion).
        max_prompt_tokens: longest prompt the module accepts.
        max_new_tokens: longest completion (sampled, or kept from the data).
        generates: a training step samples completions (GRPO, PPO, online DPO): there is a rollout phase.
        num_generations: completions sampled per prompt (1 when nothing is sampled).
        micro_batch_size: sequences per forward/backward when the user fixed it; None lets the memory plan
            choose a token budget.
        max_micro_batch_tokens: most padded tokens of a micro-batch the plan may choose (``micro_batch_size``
            None); None leaves the plan's own bound.
        gradient_checkpointing: activations are recomputed in the backward.
        offload_checkpoints: the checkpointed layers' inputs wait in host memory until their recompute.
        tile_mlps: the decoder layers' MLPs run over slices of the tokens in the update
            (:mod:`lightning_rl.tiled_mlp`).
        logprob_chunk_tokens: rows per chunk of the reference log-prob path when that path runs (its fp32
            ``[rows, vocab]`` logits count in the plan); None with the fused Triton kernel.
        extra_frozen: frozen modules the module keeps outside its registered children (a reference copy).
    """

    model_config: Any
    sequence_tokens: int
    max_prompt_tokens: int
    max_new_tokens: int
    generates: bool = False
    num_generations: int = 1
    micro_batch_size: int | None = None
    max_micro_batch_tokens: int | None = None
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False
    tile_mlps: bool = False
    logprob_chunk_tokens: int | None = None
    extra_frozen: Sequence[nn.Module] = field(default_factory=tuple)


@runtime_checkable
class ShapedModule(Protocol):
    """A module that describes its steps to the memory plan and takes the planned micro-batch back."""

    def training_shape(self) -> TrainingShape:
        """The sizes of this module's training steps (called after ``configure_model``)."""
        ...

    def apply_micro_batch_plan(self, micro_batch_tokens: int) -> None:
        """Take the plan's token budget per micro-batch (lowering a fixed ``micro_batch_size`` if needed)."""
        ...


def training_shape_of(module: object) -> TrainingShape | None:
    """``module``'s :class:`TrainingShape`, or None for a module that does not describe its steps."""
    return module.training_shape() if isinstance(module, ShapedModule) else None


def datamodule_batch_size(trainer: Any) -> int | None:
    """Prompts per training batch as the trainer's DataModule states them (its ``batch_size``), if it does."""
    size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


__all__ = ["ShapedModule", "TrainingShape", "datamodule_batch_size", "training_shape_of"]
