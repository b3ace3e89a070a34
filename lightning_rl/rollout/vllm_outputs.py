"""vLLM's completions as a :class:`~lightning_rl.rollout.engine.Rollout`: token ids, masks, sampling log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_rl.rollout.engine import Rollout
from lightning_rl.rollout.padding import left_pad, right_pad


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token from a vLLM completion's ``logprobs`` (flat or per-position dicts)."""
    if not logprobs:
        return [0.0] * len(token_ids)
    if hasattr(logprobs, "start_indices"):  # vllm.logprobs.FlatLogprobs: the sampled token comes first
        flat_ids, values = logprobs.token_ids, logprobs.logprobs
        out = []
        for start, tok in zip(logprobs.start_indices, token_ids):
            if flat_ids[start] != tok:
                raise RuntimeError(f"vLLM returned the log-prob of token {flat_ids[start]} for sampled token {tok}")
            out.append(float(values[start]))
        return out
    return [float(step[tok].logprob) for step, tok in zip(logprobs, token_ids)]


def rollout_from_outputs(
    prompt_ids: Sequence[Sequence[int]], outputs: Sequence[Any], num_generations: int, pad_token_id: int,
    extras: dict[str, Any] | None = None,
) -> Rollout:
    """A group-contiguous :class:`Rollout` from ``vllm.LLM.generate``'s outputs (one per prompt, ``n`` each)."""
    rows, completions, logprobs, reasons = [], [], [], []
    for prompt, out in zip(prompt_ids, outputs):
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            rows.append(prompt)
            completions.append(ids)
            logprobs.append(sampled_logprobs(c.logprobs, ids))
            reasons.append("stop" if c.finish_reason == "stop" else "length")
    prompt_t, prompt_mask = left_pad(rows, pad_token_id)
    completion_t, completion_mask = right_pad(completions, pad_token_id)
    lp = torch.zeros(completion_t.shape, dtype=torch.float32)
    for i, row in enumerate(logprobs):
        lp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return Rollout(
        prompt_ids=prompt_t,
        prompt_mask=prompt_mask,
        completion_ids=completion_t,
        completion_mask=completion_mask,
        sampling_logprobs=lp,
        finish_reasons=reasons,
        group_index=torch.arange(len(prompt_ids)).repeat_interleave(num_generations),
        extras=dict(extras or {}),
    )


__all__ = ["rollout_from_outputs", "sampled_logprobs"]
