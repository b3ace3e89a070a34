"""A learned reward: a sequence-classification model with one label, used as a reward function.

``RewardModel(...)(prompts, completions, **columns) -> list[float]`` has the signature of every
reward function, so GRPO and PPO take it in ``reward_funcs`` (PPO also as ``reward_model=``).

Tokenizers: the reward model always scores *text*. It renders each prompt with its own tokenizer
(through its chat template when it has one), appends the completion text and tokenizes that, so
a reward model trained with another tokenizer than the policy's works as it is. Characters its
tokenizer cannot encode become unknown tokens; ``on_unknown`` says whether that raises, warns
(default) or passes. :meth:`RewardModel.check_tokenizer` tells whether the two tokenizers match.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_rl.models import TINY_CONFIGS, tiny_config, torch_dtype
from lightning_rl.prompting import Prompt, render_prompt
from lightning_rl.tokenizer import char_tokenizer

log = logging.getLogger(__name__)

OnUnknown = Literal["error", "warn", "ignore"]


def tiny_reward_model(
    name: str = "tiny-llama", overrides: dict[str, Any] | None = None, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random one-label sequence classifier on a tiny config, with the character tokenizer (tests)."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny reward model {name!r}; choose from {sorted(TINY_CONFIGS)}")
    tokenizer = char_tokenizer()
    config = tiny_config(name, overrides, tokenizer, num_labels=1)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype(dtype)), tokenizer


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and class)."""
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab())


class RewardModel:
    """Score ``prompt + completion`` texts with a sequence-classification model that has one label.

    Args:
        model: a model (``*ForSequenceClassification`` with ``num_labels=1``), a Hugging Face id or
            local path, or ``"tiny-llama"`` / ``"tiny-qwen2"`` (random weights; for tests).
        tokenizer: the model's tokenizer (object, id or path); defaults to the one saved with
            ``model`` (required when ``model`` is a module).
        model_config: config overrides for the tiny models.
        dtype: weight dtype when loading.
        device: where to run; None picks CUDA when available (PPO moves it to its own device).
        batch_size: texts per forward.
        max_length: keep only the last ``max_length`` tokens of each text (None keeps all).
        chat_template: render plain-text prompts as a user turn of the reward model's chat template.
        on_unknown: what to do when its tokenizer cannot encode some text (unknown tokens):
            ``"error"``, ``"warn"`` (once) or ``"ignore"``.
        scale: multiply the scores by this.
        offset: add this to the scaled scores.
        name: the name the reward is logged under.
    """

    def __init__(
        self,
        model: str | nn.Module = "tiny-llama",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 16,
        max_length: int | None = 1024,
        chat_template: bool = True,
        on_unknown: OnUnknown = "warn",
        scale: float = 1.0,
        offset: float = 0.0,
        name: str = "reward_model",
    ) -> None:
        if on_unknown not in ("error", "warn", "ignore"):
            raise ValueError(f"on_unknown must be 'error', 'warn' or 'ignore', got {on_unknown!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(model, str) and model in TINY_CONFIGS:
            net, tok = tiny_reward_model(model, model_config, dtype)
        elif isinstance(model, str):
            if model_config:
                raise ValueError(f"model_config only applies to the tiny models {sorted(TINY_CONFIGS)}")
            net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch_dtype(dtype))
            tok = None
        elif isinstance(model, nn.Module):
            net, tok = model, None
        else:
            raise TypeError(f"model must be a module or a model id/path, got {type(model).__name__}")
        if isinstance(tokenizer, str):
            tok = AutoTokenizer.from_pretrained(tokenizer)
        elif tokenizer is not None:
            tok = tokenizer
        elif tok is None and isinstance(model, str):
            tok = AutoTokenizer.from_pretrained(model)
        if tok is None:
            raise ValueError("RewardModel(model=<module>) needs its tokenizer: pass tokenizer=")
        num_labels = getattr(getattr(net, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ValueError(
                f"a reward model must output one score per sequence (num_labels=1), {type(net).__name__} has "
                f"num_labels={num_labels}; load it with AutoModelForSequenceClassification(..., num_labels=1)"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if net.config.pad_token_id is None:  # the classifier finds each sequence's last token by the pad id
            net.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        tok.truncation_side = "left"
        self.model = net.eval().requires_grad_(False)
        self.tokenizer = tok
        self.device = torch.device(device) if device else None
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.on_unknown = on_unknown
        self.scale, self.offset = scale, offset
        self.__name__ = name
        self._warned = False

    def to(self, device: torch.device | str) -> RewardModel:
        """Run on ``device`` from now on."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def check_tokenizer(self, policy_tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the policy uses the same tokenizer; if not, say that scoring re-tokenizes text."""
        same = same_tokenizer(self.tokenizer, policy_tokenizer)
        if not same:
            log.info("%s: its tokenizer differs from the policy's; it scores re-tokenized text", self.__name__)
        return same

    def render(self, prompt: Prompt, completion: str) -> str:
        """The text the reward model reads for one sample."""
        if isinstance(prompt, str) or self.tokenizer.chat_template:
            head = render_prompt(self.tokenizer, prompt, None, self.chat_template)
        else:  # chat messages but no template to render them: plain concatenation
            head = "\n".join(str(m.get("content", "")) for m in prompt) + "\n"
        return head + completion

    def _check_unknown(self, ids: torch.Tensor, mask: torch.Tensor, texts: Sequence[str]) -> None:
        unk = self.tokenizer.unk_token_id
        if self.on_unknown == "ignore" or unk is None:
            return
        hits = ((ids == unk) & mask.bool()).any(-1).nonzero().flatten().tolist()
        hits = [i for i in hits if self.tokenizer.unk_token not in texts[i]]
        if not hits:
            return
        msg = (
            f"{self.__name__}: its tokenizer cannot encode part of {len(hits)} text(s) (unknown tokens), e.g. "
            f"{texts[hits[0]][-80:]!r}; the scores of those texts are unreliable. Use a reward model whose "
            "tokenizer covers the policy's output (or the same tokenizer), or pass on_unknown='ignore'."
        )
        if self.on_unknown == "error":
            raise ValueError(msg)
        if not self._warned:
            warnings.warn(msg, stacklevel=3)
            self._warned = True

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Any) -> list[float]:
        """One score per completion (the classifier's logit at the last token, scaled and offset)."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions; give one each")
        if self.device is None:
            self.to("cuda" if torch.cuda.is_available() else "cpu")
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        # a chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
        templated = bool(self.tokenizer.chat_template) and (
            self.chat_template or not all(isinstance(p, str) for p in prompts))
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc = self.tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=self.max_length is not None,
                max_length=self.max_length, add_special_tokens=not templated,
            )
            self._check_unknown(enc["input_ids"], enc["attention_mask"], chunk)
            out = self.model(input_ids=enc["input_ids"].to(self.device),
                             attention_mask=enc["attention_mask"].to(self.device))
            scores.extend((out.logits[:, 0].float() * self.scale + self.offset).tolist())
        return scores
