"""Render prompts (plain text or chat messages) into token ids with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[Mapping[str, Any]]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the configured limit."""


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, system_prompt: str | None = None, chat: bool = True
) -> str:
    """Text the model sees for one prompt.

    A list of messages always goes through the chat template. A plain string goes through it as
    one user turn when ``chat`` is true and the tokenizer has a template, else stays as it is.
    """
    if isinstance(prompt, str) and not (chat and tokenizer.chat_template):
        return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not tokenizer.chat_template:
        raise ValueError(
            "the prompt is a list of chat messages but the tokenizer has no chat template; "
            "give plain-text prompts or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_preview(prompt: Prompt, chars: int = 60) -> str:
    """The first ``chars`` characters of a prompt's own text (a chat prompt's first user message)."""
    if isinstance(prompt, str):
        text = prompt
    else:
        messages = [m for m in prompt if isinstance(m, Mapping)]
        user = [m for m in messages if m.get("role") == "user"] or messages
        text = str(user[0].get("content", "")) if user else ""
    return text if len(text) <= chars else text[:chars] + "..."


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    system_prompt: str | None = None,
    chat: bool = True,
    max_prompt_length: int | None = None,
    truncate: bool = False,
    names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Token ids of each rendered prompt (no padding).

    Args:
        tokenizer: the policy's tokenizer.
        prompts: strings or chat-message lists.
        system_prompt: optional system message.
        chat: wrap plain strings in the chat template.
        max_prompt_length: refuse (or left-truncate, with ``truncate``) longer prompts.
        truncate: keep the last ``max_prompt_length`` tokens instead of refusing.
        names: what to call each prompt in an error ("train row 25"); by default its position in the batch.
    """
    out = []
    for i, p in enumerate(prompts):
        text = render_prompt(tokenizer, p, system_prompt, chat)
        templated = not isinstance(p, str) or bool(chat and tokenizer.chat_template)
        # a chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if not truncate:
                name = f"prompt {i}" if names is None else names[i]
                note = "" if names is not None else f"{i} is its position in this batch, not its dataset row; "
                raise PromptTooLongError(
                    f"{name} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length} ({note}the prompt "
                    f"starts {prompt_preview(p)!r}); raise max_prompt_length or set truncate_prompts=True to keep "
                    "the last tokens"
                )
            ids = ids[-max_prompt_length:]
        out.append(list(ids))
    return out
