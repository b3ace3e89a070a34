"""The longest prompt of a fit's data, in tokens: what a KV cache sized from the data must hold for a prompt.

A module refuses prompts longer than its ``max_prompt_length`` (512 tokens by default), and the rollout engine's
KV cache is sized for prompts of that length unless told otherwise. Short prompts (a 45-token arithmetic question
in the chat template) then leave most of that room unused: for SmolLM2 with 16 prompts a step, about 0.2 GiB.
:func:`longest_prompt_tokens` renders the prompts a prompt DataModule holds (its ``train_rows`` and
``val_rows``) the way the module does and returns the longest, so the cache can be sized from the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: Datasets with more rows than this are not rendered at setup (the KV cache keeps the module's limit).
MAX_PROMPT_ROWS = 50_000


def longest_prompt_tokens(
    datamodule: Any, encode: Callable[[Sequence[Any]], list[list[int]]], max_rows: int = MAX_PROMPT_ROWS
) -> int | None:
    """Tokens of the longest prompt in ``datamodule``'s training and validation rows, as ``encode`` renders them.

    Args:
        datamodule: a DataModule that keeps its rows as dicts with a ``prompt`` key in ``train_rows`` (and
            optionally ``val_rows``) after ``setup``, like :class:`~lightning_rl.PromptDataModule`.
        encode: the module's prompt encoder (chat template, system prompt, length check).
        max_rows: give up on datasets with more rows than this.

    Returns:
        The longest prompt's token count, or None when the datamodule keeps no such rows or too many.
    """
    train = getattr(datamodule, "train_rows", None)
    if not isinstance(train, Sequence) or not train:
        return None
    val = getattr(datamodule, "val_rows", None)
    rows = [*train, *(val if isinstance(val, Sequence) else ())]
    if len(rows) > max_rows or not all(isinstance(r, dict) and "prompt" in r for r in rows):
        return None
    return max(len(ids) for ids in encode([r["prompt"] for r in rows]))


__all__ = ["MAX_PROMPT_ROWS", "longest_prompt_tokens"]
