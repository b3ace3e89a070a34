"""The longest sequence a model has positions for, and the check that a rollout's sequences stay within it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_rl.prompting import PromptTooLongError

log = logging.getLogger(__name__)

#: Config fields that give a model's positions, in the order they are looked up (Llama/Qwen/Mistral, GPT-2, ...).
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(model: nn.Module | None) -> tuple[int, str] | None:
    """``(positions, config field)`` of ``model``'s config, or None when the config names none."""
    config = getattr(model, "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def check_sequences_fit(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, model: nn.Module | None,
                        names: Sequence[str] | None = None) -> None:
    """Refuse prompts whose completions could run past the model's positions.

    A model with learned positions (GPT-2) fails there with an index error deep in torch, and one with rotary
    positions computes at positions it was never trained on. ``names`` say what each prompt is in the error
    ("train row 25"); by default its position in the batch.

    Raises:
        PromptTooLongError: naming the longest prompt, the limit and the settings that fix it.
    """
    limit = position_limit(model)
    if limit is None or not prompt_ids:
        return
    positions, field = limit
    i = max(range(len(prompt_ids)), key=lambda k: len(prompt_ids[k]))
    longest = len(prompt_ids[i])
    if longest + max_new_tokens <= positions:
        return
    name = f"prompt {i} of this batch" if names is None else names[i]
    raise PromptTooLongError(
        f"{name} has {longest} tokens; with max_new_tokens={max_new_tokens} its sequence can reach "
        f"{longest + max_new_tokens} tokens, more than the model's {positions} positions (config.{field}). Set the "
        f"module's max_prompt_length to at most {max(positions - max_new_tokens, 1)} (truncate_prompts=True keeps "
        "the last tokens of longer prompts) or lower sampling.max_new_tokens")


def encode_within_positions(module: Any, prompts: Sequence[Any], max_new_tokens: int) -> list[list[int]]:
    """``module.encode(prompts)``, refused by :func:`check_sequences_fit` against ``module.policy``'s positions.

    What every rollout's prompts pass before an engine generates from them (the module's own rollouts and the
    callback's next batch alike).

    Raises:
        PromptTooLongError: a prompt longer than the module's ``max_prompt_length``, or one whose completion could
            run past the model's positions.
    """
    ids = module.encode(prompts)
    check_sequences_fit(ids, max_new_tokens, module.policy)
    return ids


def check_data_prompts(module: Any, datamodule: Any) -> None:
    """Render every prompt the fit's DataModule keeps and refuse the first that a rollout would refuse.

    Training rows against ``module.sampling``, validation rows against ``module.val_sampling``: each within
    ``max_prompt_length`` and, with its completion, within the model's positions. Without this a prompt in row
    25,000 stops the run hours in, named by its place in a batch. Nothing for data kept otherwise
    (:func:`~lightning_rl.rollout.data_prompts.data_prompts`).

    Raises:
        PromptTooLongError: naming the split and row, the prompt's start, the limit and the fix.
    """
    from lightning_rl.rollout.data_prompts import MAX_PROMPT_ROWS, encoded_data_prompts, kept_rows, row_names

    if not _prompts_can_fail(module):
        return
    encoded = encoded_data_prompts(datamodule, module.encode)
    if encoded is None:
        rows = kept_rows(datamodule)
        if rows is not None and sum(map(len, rows)) > MAX_PROMPT_ROWS:  # too many to render
            log.info("the data's prompts are checked batch by batch: more than %d rows to render at fit start",
                     MAX_PROMPT_ROWS)
        return
    for split, sampling in (("train", module.sampling), ("validation", module.val_sampling)):
        ids = encoded[split]
        check_sequences_fit(ids, sampling.max_new_tokens, module.policy, row_names(split, len(ids)))


def _prompts_can_fail(module: Any) -> bool:
    """Whether some prompt could be refused: not when prompts are cut to a ``max_prompt_length`` whose sequences
    fit the model's positions, nor without a limit on a model without positions.
    """
    length = module.max_prompt_length
    limit = position_limit(module.policy)
    longest_new = max(module.sampling.max_new_tokens, module.val_sampling.max_new_tokens)
    if length is None:
        return limit is not None
    if not module.truncate_prompts:
        return True
    return limit is not None and length + longest_new > limit[0]


__all__ = ["POSITION_FIELDS", "check_data_prompts", "check_sequences_fit", "encode_within_positions",
           "position_limit"]
