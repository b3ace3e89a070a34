"""How big a module's training steps are: the shape it reports, and its micro-batches."""

from __future__ import annotations

import logging

import torch

from lightning_rl.logprobs import resolve_backend, unwrap
from lightning_rl.lora import is_lora
from lightning_rl.rollout.engine import SamplingConfig
from lightning_rl.shapes import TrainingShape

log = logging.getLogger(__name__)


class StepSizes:
    """Mixed into :class:`~lightning_rl.modules.policy.PolicyModule`: what the memory plan and the callback read.

    :meth:`training_shape` describes a step (:mod:`lightning_rl.shapes`); the plan answers through
    :meth:`apply_micro_batch_plan`; :meth:`micro_batch_for` sizes each step's micro-batches.
    """

    #: Whether a training step samples completions (a rollout phase for the memory plan and the callback).
    generates_rollouts: bool = False
    #: How training completions are sampled; set by the modules that sample.
    sampling: SamplingConfig | None = None
    #: Completions sampled per prompt.
    num_generations: int = 1
    #: Examples per forward/backward (None: sized from ``micro_batch_tokens``).
    micro_batch_size: int | None = None
    #: Sequences one example puts through the policy in a micro-batch (a preference pair: 2).
    sequences_per_example: int = 1
    #: The checkpointed layers' inputs wait in host memory (resolved by the module's ``setup``).
    offload_checkpoints: bool = False
    #: The decoder layers' MLPs run over slices of the tokens in the update (the module's ``tile_mlps``).
    tile_mlps: bool = False

    def auto_micro_batch_tokens(self) -> int | None:
        """Tokens per forward/backward when ``micro_batch_size`` is None and no memory plan set them.

        On CUDA: what the free device memory holds after gradients and optimizer states, at most
        :meth:`micro_batch_token_limit` or :data:`~lightning_rl.plugins.memory_plan.MAX_MICRO_BATCH_TOKENS`;
        elsewhere None (each optimizer step's share of the rollout in one micro-batch).
        """
        if self.device.type != "cuda" or self.policy is None:
            return None
        from lightning_rl.plugins.memory_plan import (
            MAX_MICRO_BATCH_TOKENS,
            activation_bytes_per_token,
            micro_batch_tokens_for,
        )

        free, _ = torch.cuda.mem_get_info(self.device)
        trainable = self.trainable_parameters()
        state_bytes = sum(p.numel() * (p.element_size() + 8) for p in trainable)  # gradient + two AdamW moments
        mixed = str(self.trainer.precision).startswith(("bf16", "16"))
        act_dtype = 2 if mixed else next(self.policy.parameters()).element_size()
        per_token = activation_bytes_per_token(unwrap(self.policy).config, act_dtype, self.gradient_checkpointing,
                                               self.offload_checkpoints, self.tile_mlps)
        return micro_batch_tokens_for(free - state_bytes, per_token,
                                      limit=self.micro_batch_token_limit() or MAX_MICRO_BATCH_TOKENS)

    def micro_batch_token_limit(self) -> int | None:
        """Most padded tokens of a micro-batch sized automatically, below what memory allows.

        :data:`~lightning_rl.plugins.memory_plan.ADAPTER_MICRO_BATCH_TOKENS` when only adapters train (a peft
        policy): its update's memory is then mostly activations, and a smaller micro-batch lowers the peak
        for little time beside an overlapped generation. None otherwise (the plan's own bound).
        """
        from lightning_rl.plugins.memory_plan import ADAPTER_MICRO_BATCH_TOKENS

        return ADAPTER_MICRO_BATCH_TOKENS if self.policy is not None and is_lora(self.policy) else None

    def training_shape(self) -> TrainingShape:
        """The sizes of this module's steps, for the memory plan and the rollout callback (:mod:`lightning_rl.shapes`).

        Call it after ``configure_model``. Subclasses with other lengths override :meth:`step_lengths`.
        """
        prompt, new = self.step_lengths()
        generates = self.generates_rollouts and self.sampling is not None
        micro = self.micro_batch_size
        reference = resolve_backend(self.logprob_backend, self.device) == "reference"
        return TrainingShape(
            model_config=unwrap(self.policy).config,
            sequence_tokens=prompt + new,
            max_prompt_tokens=prompt,
            max_new_tokens=new,
            generates=generates,
            num_generations=int(self.num_generations) if generates else 1,
            micro_batch_size=None if micro is None else micro * self.sequences_per_example,
            max_micro_batch_tokens=self.micro_batch_token_limit(),
            gradient_checkpointing=bool(self.gradient_checkpointing),
            offload_checkpoints=bool(self.offload_checkpoints),
            tile_mlps=bool(self.tile_mlps),
            logprob_chunk_tokens=self.logprob_chunk_size if reference else None,
            extra_frozen=tuple(self._frozen_reference),
        )

    def step_lengths(self) -> tuple[int, int]:
        """``(prompt tokens, completion tokens)`` of the longest training sequence (1024 for an unlimited prompt)."""
        new = int(self.sampling.max_new_tokens) if self.sampling is not None else 0
        return int(self.max_prompt_length or 1024), new

    def apply_micro_batch_plan(self, micro_batch_tokens: int) -> None:
        """Take the memory plan's token budget per micro-batch.

        With ``micro_batch_size`` None the budget is used as is (micro-batches then follow each rollout's
        padded length); a fixed ``micro_batch_size`` is lowered to the whole examples that fit.
        """
        if self.micro_batch_size is None:
            self.micro_batch_tokens = int(micro_batch_tokens)
            return
        seq = self.training_shape().sequence_tokens * self.sequences_per_example
        planned = max(1, micro_batch_tokens // max(1, seq))
        if planned < self.micro_batch_size:
            log.warning("memory plan: micro_batch_size lowered from %d to %d", self.micro_batch_size, planned)
            self.micro_batch_size = planned

    def micro_batch_for(self, num_sequences: int, sequence_tokens: int) -> int:
        """Sequences per forward/backward for ``num_sequences`` rows of ``sequence_tokens`` padded tokens.

        ``micro_batch_size`` when set; else the fewest micro-batches that ``micro_batch_tokens`` (from the
        memory plan or :meth:`auto_micro_batch_tokens`) holds, evened out (128 sequences of which 94 fit go as
        two of 64, not 94 and 34: the same passes at a lower peak); else all of them.
        """
        if self.micro_batch_size:
            return max(1, min(self.micro_batch_size, num_sequences))
        if self.micro_batch_tokens:
            fit = max(1, self.micro_batch_tokens // max(1, sequence_tokens))
            passes = max(1, -(-num_sequences // fit))
            return max(1, -(-num_sequences // passes))
        return max(1, num_sequences)
