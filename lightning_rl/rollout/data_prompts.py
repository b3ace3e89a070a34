"""The longest prompt of a fit's data, in tokens: what a KV cache sized from the data must hold for a prompt.

A module refuses prompts longer than its ``max_prompt_length`` (512 tokens by default), and the rollout engine's
KV cache is sized for prompts of that length unless told otherwise. Short prompts (a 45-token arithmetic question
in the chat template) then leave most of that room unused: for SmolLM2 with 16 prompts a step, about 0.2 GiB.
:func:`longest_prompt_tokens` renders the prompts a prompt DataModule holds (its ``train_rows`` and
``val_rows``) the way the module does and returns the longest, so the cache can be sized from the data.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

#: Datasets with more rows than this are not rendered at setup (the KV cache keeps the module's limit).
MAX_PROMPT_ROWS = 50_000


def data_prompts(datamodule: Any, max_rows: int = MAX_PROMPT_ROWS) -> dict[str, list[Any]] | None:
    """The prompts ``datamodule`` keeps, by split: ``{"train": [...], "validation": [...]}`` (row order).

    Args:
        datamodule: a DataModule that keeps its rows as dicts with a ``prompt`` key in ``train_rows`` (and
            optionally ``val_rows``) after ``setup``, like :class:`~lightning_rl.PromptDataModule`.
        max_rows: give up on datasets with more rows than this.

    Returns:
        None when the datamodule keeps no such rows, or more than ``max_rows``.
    """
    rows = kept_rows(datamodule)
    if rows is None:
        return None
    train, val = rows
    if len(train) + len(val) > max_rows or not all(isinstance(r, dict) and "prompt" in r for r in (*train, *val)):
        return None
    return {"train": [r["prompt"] for r in train], "validation": [r["prompt"] for r in val]}


def kept_rows(datamodule: Any) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """The training and validation rows ``datamodule`` keeps: ``train_rows`` and ``val_rows`` (empty without them).

    None when it keeps no training rows.
    """
    train = getattr(datamodule, "train_rows", None)
    if not isinstance(train, Sequence) or not train:
        return None
    val = getattr(datamodule, "val_rows", None)
    return train, val if isinstance(val, Sequence) else ()


def encode_data_prompts(
    prompts: dict[str, list[Any]], encode: Callable[..., list[list[int]]]
) -> dict[str, list[list[int]]]:
    """``encode`` on each split of :func:`data_prompts`, each prompt named by its split and row in an error.

    An ``encode`` that takes no ``names`` (a subclass's own) is called without them.
    """
    try:
        params = inspect.signature(encode).parameters
        named = "names" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        named = False
    out: dict[str, list[list[int]]] = {}
    for split, rows in prompts.items():
        names = row_names(split, len(rows))
        out[split] = (encode(rows, names=names) if named else encode(rows)) if rows else []
    return out


def row_names(split: str, count: int) -> list[str]:
    """What errors call the first ``count`` rows of ``split``: ``"train row 25"``."""
    return [f"{split} row {k}" for k in range(count)]


#: The module settings that change how its ``encode`` renders a prompt.
_ENCODING_SETTINGS = ("max_prompt_length", "truncate_prompts", "system_prompt", "chat_template")


def encoded_data_prompts(
    datamodule: Any, encode: Callable[..., list[list[int]]], max_rows: int = MAX_PROMPT_ROWS
) -> dict[str, list[list[int]]] | None:
    """:func:`encode_data_prompts` of :func:`data_prompts`, rendered once per fit and kept on the DataModule.

    The module's check at fit start and the rollout callback's KV-cache sizing both need them; rendering 50,000
    prompts takes seconds to a minute. None when the DataModule keeps no rows to render, or too many.
    """
    owner = getattr(encode, "__self__", encode)
    key = (id(owner), id(getattr(datamodule, "train_rows", None)), id(getattr(datamodule, "val_rows", None)),
           max_rows, *(repr(getattr(owner, name, None)) for name in _ENCODING_SETTINGS))
    cached = getattr(datamodule, "_lightning_rl_encoded_prompts", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    prompts = data_prompts(datamodule, max_rows)
    if prompts is None:
        return None
    encoded = encode_data_prompts(prompts, encode)
    with contextlib.suppress(AttributeError):  # a DataModule with __slots__: rendered again next time
        datamodule._lightning_rl_encoded_prompts = (key, encoded)
    return encoded


def longest_prompt_tokens(
    datamodule: Any, encode: Callable[..., list[list[int]]], max_rows: int = MAX_PROMPT_ROWS
) -> int | None:
    """Tokens of the longest prompt in ``datamodule``'s training and validation rows, as ``encode`` renders them.

    Args:
        datamodule: see :func:`data_prompts`.
        encode: the module's prompt encoder (chat template, system prompt, length check), called as
            ``encode(prompts, names=...)``.
        max_rows: give up on datasets with more rows than this.

    Returns:
        The longest prompt's token count, or None when the datamodule keeps no such rows or too many.
    """
    encoded = encoded_data_prompts(datamodule, encode, max_rows)
    if encoded is None:
        return None
    return max(len(ids) for split in encoded.values() for ids in split)


__all__ = ["MAX_PROMPT_ROWS", "data_prompts", "encode_data_prompts", "encoded_data_prompts", "kept_rows",
           "longest_prompt_tokens", "row_names"]
