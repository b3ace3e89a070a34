"""The rollout protocol: what every rollout engine (transformers, vLLM) returns and implements."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lightning_rl.whole_numbers import is_whole_number


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        max_new_tokens: generation limit per completion.
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling threshold (1.0 disables it).
        top_k: keep only the k most likely tokens (``None`` or 0 disables it).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not is_whole_number(n, 1):
            raise ValueError(f"max_new_tokens must be a whole number of tokens >= 1, got {n!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a positive number of tokens, or None (or 0) to sample from all tokens; "
                             f"got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy."""
        return self.temperature == 0


@dataclass
class Rollout:
    """A batch of sampled completions, ``G`` per prompt, laid out group-contiguous.

    Row ``i`` belongs to prompt ``group_index[i]``; rows of one prompt are adjacent.

    Attributes:
        prompt_ids: ``[N, P]`` left-padded prompt token ids.
        prompt_mask: ``[N, P]`` 1 on real prompt tokens.
        completion_ids: ``[N, C]`` right-padded completion token ids (EOS included when produced).
        completion_mask: ``[N, C]`` 1 on generated tokens up to and including the first EOS.
        sampling_logprobs: ``[N, C]`` log-probs of each sampled token under the distribution the engine drew
            it from: temperature-scaled and, with ``top_k`` / ``top_p``, truncated and renormalized (vLLM's
            processed log-probs; the transformers engine's processed scores) (0 on padding).
        finish_reasons: ``"stop"`` (EOS reached) or ``"length"`` (truncated) per row.
        group_index: ``[N]`` index of the prompt each row answers.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    finish_reasons: list[str]
    group_index: torch.Tensor
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        for f in ("prompt_mask", "completion_ids", "completion_mask", "sampling_logprobs", "group_index"):
            if getattr(self, f).shape[0] != n:
                raise ValueError(f"Rollout.{f} has {getattr(self, f).shape[0]} rows, prompt_ids has {n}")
        if len(self.finish_reasons) != n:
            raise ValueError(f"Rollout.finish_reasons has {len(self.finish_reasons)} rows, expected {n}")

    @property
    def num_sequences(self) -> int:
        """Number of completions."""
        return self.prompt_ids.shape[0]

    @property
    def sequence_length(self) -> int:
        """Padded tokens of one row (prompt + completion): what a forward pass over the rollout costs per row."""
        return self.prompt_ids.shape[1] + self.completion_ids.shape[1]

    @property
    def truncated(self) -> torch.Tensor:
        """``[N]`` bool, True where the completion hit the length limit."""
        return torch.tensor([r == "length" for r in self.finish_reasons], device=self.prompt_ids.device)

    def to(self, device: torch.device | str) -> Rollout:
        """Return a copy with every tensor on ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return Rollout(**kw)


@runtime_checkable
class RolloutEngine(Protocol):
    """What GRPO, PPO and online DPO need from a rollout engine.

    Engines that live beside the policy on the same device (vLLM colocated) use ``wake_up``,
    ``sleep`` and ``sync_weights`` to share the GPU with training; the transformers engine
    generates with the policy itself and makes them no-ops.
    """

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, num_generations: int
    ) -> Rollout:
        """Sample ``num_generations`` completions for each prompt (token ids, no padding)."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine generate with ``model``'s current weights."""
        ...

    def wake_up(self) -> None:
        """Take device memory back for generation."""
        ...

    def sleep(self) -> None:
        """Give device memory back to training."""
        ...
