"""Shared base of the preference modules (DPO, ORPO, KTO): tokenized responses, log-probs, reference cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import override

from lightning_rl.data.preferences import response_text
from lightning_rl.modules.metrics import several_processes
from lightning_rl.modules.policy import PolicyModule
from lightning_rl.prompting import Prompt, render_prompt
from lightning_rl.rollout.padding import left_pad, right_pad
from lightning_rl.samples import StepSamples

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "live", "precomputed"]
PairLosses = Callable[["Sequences", torch.Tensor], dict[str, torch.Tensor]]
REFERENCE_MODES: tuple[str, ...] = ("auto", "live", "precomputed")


@dataclass
class Sequences:
    """Prompt + response token tensors in the :class:`~lightning_rl.rollout.Rollout` layout.

    Attributes:
        prompt_ids: ``[N, P]`` left-padded prompt ids.
        prompt_mask: ``[N, P]`` 1 on real prompt tokens.
        completion_ids: ``[N, C]`` right-padded response ids (ending with EOS unless truncated).
        completion_mask: ``[N, C]`` 1 on real response tokens.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def rows(self, index: torch.Tensor | slice) -> Sequences:
        """The sequences at ``index``, with padding columns that no row uses trimmed."""
        pm, cm = self.prompt_mask[index], self.completion_mask[index]
        p_keep = int(pm.sum(-1).max()) if pm.numel() else 0
        c_keep = max(int(cm.sum(-1).max()) if cm.numel() else 1, 1)
        p0 = pm.shape[1] - max(p_keep, 1)
        return Sequences(self.prompt_ids[index][:, p0:], pm[:, p0:], self.completion_ids[index][:, :c_keep],
                         cm[:, :c_keep])


def content_key(value: Any) -> int:
    """A nonzero signed 64-bit hash of ``value`` (strings, numbers, lists and dicts of them; others by ``str``)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)
    return key or 1


class PreferenceModule(PolicyModule):
    """Base of DPO, ORPO and KTO: turns text rows into token tensors and log-probs, and owns the reference.

    Reference log-probs come from (``reference=``):

    - ``live``: the adapter-disabled base with LoRA (no extra memory), else a frozen copy of the policy.
    - ``precomputed``: computed once with the initial policy, before the first optimizer step, for
      every training and validation row of the datamodule (cached by row index with a key of the
      row's content, saved in checkpoints): no second model in memory and no reference forward during
      training. A row whose content no longer matches its cached key (other data of the same size)
      is computed again while the policy is still the initial one, and refused after that.
    - ``auto``: ``live`` with LoRA (or online generation), else ``precomputed``.

    Args:
        reference: ``auto``, ``live`` or ``precomputed``.
        max_completion_length: keep at most this many tokens of each response (None keeps all).
        micro_batch_size: examples per forward/backward (pairs for DPO and ORPO, rows for KTO); gradients
            accumulate over them.
        **kwargs: the :class:`~lightning_rl.modules.policy.PolicyModule` arguments (model, lora, learning_rate, ...).
    """

    uses_reference: bool = True
    sequences_per_example = 2  # a pair: chosen and rejected go through the policy together

    def __init__(
        self,
        reference: ReferenceMode = "auto",
        max_completion_length: int | None = 512,
        micro_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_completion_length is not None and max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 or None, got {max_completion_length}")
        super().__init__(**kwargs)
        self.reference = reference
        self.max_completion_length = max_completion_length
        self.micro_batch_size = micro_batch_size
        # split -> row index -> (content key of the row, or None from an older checkpoint; reference log-probs [K])
        self._ref_cache: dict[str, dict[int, tuple[int | None, torch.Tensor]]] = {}
        self._policy_updated = False
        self._warned_template_fallback = False

    @override
    def step_lengths(self) -> tuple[int, int]:
        """``(prompt tokens, response tokens)``: responses are sampled (online) or cut at ``max_completion_length``."""
        prompt = int(self.max_prompt_length or 1024)
        if self.online and self.sampling is not None:
            return prompt, int(self.sampling.max_new_tokens)
        return prompt, int(self.max_completion_length or 1024)

    # ----------------------------------------------------------------------------- reference
    @property
    def online(self) -> bool:
        """Whether responses are generated during training (then the reference must be live)."""
        return False

    @property
    def reference_mode(self) -> str:
        """``live``, ``precomputed`` or ``none`` (reference-free methods)."""
        if not self.uses_reference:
            return "none"
        if self.reference != "auto":
            return self.reference
        return "live" if self.lora is not None or self.online else "precomputed"

    @property
    @override
    def needs_reference_model(self) -> bool:
        return self.reference_mode == "live"

    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        """The ``(prompts, responses)`` whose reference log-probs a batch needs, one entry per column."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _eval_mode(self, model: nn.Module) -> Iterator[nn.Module]:
        was = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was)

    @torch.no_grad()
    def compute_reference_logps(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``[B, K]`` summed reference log-probs of the batch's ``K`` response columns (eval mode, no grad)."""
        targets = self.reference_targets(batch)
        n = len(targets[0][0])
        seqs = self.tokenize([p for prompts, _ in targets for p in prompts],
                             [r for _, responses in targets for r in responses])
        if self.reference_mode == "precomputed":
            ctx = contextlib.nullcontext(self.policy)
        else:
            ctx = self.reference_model()
        out = []
        with ctx as ref, self._eval_mode(ref):
            for start in range(0, seqs.prompt_ids.shape[0], 2 * self.micro_batch_size):
                sub = seqs.rows(slice(start, start + 2 * self.micro_batch_size))
                out.append(self.summed_logps(ref, sub))
        return torch.cat(out).view(len(targets), n).T.contiguous()

    def row_keys(self, batch: Mapping[str, Any]) -> list[int]:
        """A content key per row of ``batch``: a hash of its reference targets and the tokenization settings."""
        targets = self.reference_targets(batch)
        settings = [self.max_prompt_length, self.max_completion_length, self.truncate_prompts, self.system_prompt,
                    self.chat_template]
        return [content_key([settings, [[prompts[i], responses[i]] for prompts, responses in targets]])
                for i in range(len(targets[0][0]))]

    def _stale_rows(self, batch: Mapping[str, Any], split: str) -> tuple[list[int], list[int], list[int]]:
        """``(keys, missing, changed)``: row keys, and the rows of ``batch`` not cached / cached for other content."""
        cache = self._ref_cache.get(split, {})
        keys = self.row_keys(batch)
        missing, changed = [], []
        for i, (idx, key) in enumerate(zip(batch["index"], keys)):
            entry = cache.get(int(idx))
            if entry is None:
                missing.append(i)
            elif entry[0] is not None and entry[0] != key:
                changed.append(i)
        return keys, missing, changed

    def _refuse_stale(self, batch: Mapping[str, Any], split: str, missing: list[int], changed: list[int]) -> None:
        """Raise the error of rows whose reference log-probs cannot be computed any more (the policy has moved)."""
        if changed:
            rows = [int(batch["index"][i]) for i in changed][:5]
            raise RuntimeError(
                f"the precomputed reference log-probs of rows {rows} of the {split} data were computed for other rows "
                "(the rows at these positions changed: another dataset of the same size, an edited file, or other "
                "max_prompt_length/max_completion_length/system_prompt settings), and the policy has already been "
                "updated so they cannot be computed again. Pass the data the reference log-probs were computed for "
                "(evaluate other held-out data by giving it as val_data when the fit starts), or train with "
                "reference='live'."
            )
        rows = [int(batch["index"][i]) for i in missing][:5]
        raise RuntimeError(
            f"no precomputed reference log-probs for rows {rows} of the {split} data, and the policy has already been "
            "updated so they cannot be computed now. They are computed at the start of fit for the datamodule's "
            "rows; give the same data, or set reference='live'."
        )

    def reference_logps(self, batch: Mapping[str, Any], split: str) -> torch.Tensor:
        """``[B, K]`` reference log-probs: live, or looked up in the precomputed cache by ``batch["index"]``.

        A cached entry is used only for the row it was computed for (same content key); other rows are
        computed now while the policy is still the initial one.

        Raises:
            RuntimeError: a row is not cached (or was cached for other content) and the policy has been updated.
        """
        self.check_batch(batch)
        if self.reference_mode != "precomputed":
            return self.compute_reference_logps(batch)
        return self._cached_reference(batch, split)[0]

    def _cached_reference(self, batch: Mapping[str, Any], split: str) -> tuple[torch.Tensor, int]:
        """The precomputed ``[B, K]`` reference log-probs of ``batch`` and how many rows were computed now."""
        if "index" not in batch:
            raise KeyError("precomputed reference log-probs need an 'index' column in each batch (the row's "
                           "position); use PreferenceDataModule or set reference='live'")
        cache = self._ref_cache.setdefault(split, {})
        keys, missing, changed = self._stale_rows(batch, split)
        todo = sorted(missing + changed)
        if todo:
            if self._policy_updated:
                self._refuse_stale(batch, split, missing, changed)
            sub = {k: [v[i] for i in todo] if isinstance(v, list) else v for k, v in batch.items()}
            values = self.compute_reference_logps(sub).cpu()
            for j, i in enumerate(todo):
                cache[int(batch["index"][i])] = (keys[i], values[j])
        return torch.stack([cache[int(idx)][1] for idx in batch["index"]]).to(self.device), len(todo)

    def precompute_reference(self, batches: Iterable[Mapping[str, Any]], split: str) -> int:
        """Fill the reference cache of ``split`` from ``batches`` (rows cached for the same content are kept).

        Returns:
            The number of rows computed (new rows, and rows whose content changed).
        """
        computed = 0
        for batch in batches:
            self.check_batch(batch)
            computed += self._cached_reference(batch, split)[1]
        return computed

    def check_reference_cache(self, batches: Iterable[Mapping[str, Any]], split: str) -> None:
        """Raise (as a lookup would) when a row of ``batches`` has no cached reference log-probs for its content."""
        for batch in batches:
            self.check_batch(batch)
            _, missing, changed = self._stale_rows(batch, split)
            if missing or changed:
                self._refuse_stale(batch, split, missing, changed)

    def _precompute_from_trainer(self, use_loaders: bool) -> None:
        if self.reference_mode != "precomputed":
            return
        dm = getattr(self.trainer, "datamodule", None)
        from_loaders = False  # the trainer's loaders: each process sees its sampler's share of the rows
        if dm is not None and hasattr(dm, "reference_dataloader"):
            if use_loaders:  # on_fit_start walked the datamodule's reference loaders already
                return
            sources = [(dm.reference_dataloader("train"), "train"), (dm.reference_dataloader("val"), "val")]
            if self._policy_updated:  # a resumed or second fit: refuse changed data now, not at its first batch
                for loader, split in sources:
                    if loader is not None:
                        self.check_reference_cache(loader, split)
                return
        elif self._policy_updated:
            return
        elif use_loaders:
            vals = self.trainer.val_dataloaders
            vals = vals if isinstance(vals, (list, tuple)) else [vals] if vals is not None else []
            sources = [(self.trainer.train_dataloader, "train")] + [(v, "val") for v in vals]
            from_loaders = True
        else:
            return
        for loader, split in sources:
            if loader is not None:
                added = self.precompute_reference(loader, split)
                if added:
                    log.info("precomputed reference log-probs of %d %s rows", added, split)
        if from_loaders:
            self._share_reference_cache()

    def _share_reference_cache(self) -> None:
        """Under several processes, give each the reference log-probs the others precomputed.

        The trainer's loaders hand each process its sampler's share of the rows; a later epoch reshuffles the rows
        over the processes (and the checkpoint, written by rank 0, must hold every row for a resumed run).
        """
        if not several_processes():
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._ref_cache)
        for part in parts:
            for split, rows in part.items():
                self._ref_cache.setdefault(split, {}).update(rows)

    @override
    def on_fit_start(self) -> None:
        """Move the frozen reference to the device and precompute reference log-probs from the datamodule."""
        super().on_fit_start()
        self._precompute_from_trainer(use_loaders=False)

    @override
    def on_train_start(self) -> None:
        """Precompute reference log-probs from the dataloaders when fit got no preference datamodule."""
        super().on_train_start()
        self._precompute_from_trainer(use_loaders=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the precomputed reference log-probs and their rows' content keys (a few numbers per row)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["preference_reference_cache"] = {
            split: {"index": torch.tensor(list(c)), "logps": torch.stack([v for _, v in c.values()]),
                    "keys": torch.tensor([0 if k is None else k for k, _ in c.values()], dtype=torch.int64)}
            for split, c in self._ref_cache.items() if c
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the reference cache; a checkpoint of a trained policy cannot precompute again."""
        super().on_load_checkpoint(checkpoint)
        self._policy_updated = checkpoint.get("global_step", 0) > 0
        for split, c in checkpoint.get("preference_reference_cache", {}).items():
            keys = c["keys"].tolist() if "keys" in c else [0] * len(c["index"])
            if "keys" not in c:
                log.warning("the checkpoint's precomputed reference log-probs of the %s data have no row keys (saved "
                            "by an older version): they are used by row position, unchecked", split)
            self._ref_cache[split] = {int(i): (k or None, v) for i, k, v in zip(c["index"].tolist(), keys, c["logps"])}

    @override
    def optimizer_step_checked(self, loss_value: float | torch.Tensor) -> dict[str, float]:
        result = super().optimizer_step_checked(loss_value)
        if not result["skipped"]:
            self._policy_updated = True
        return result

    def record_pair_samples(self, prompts: Sequence[Prompt], chosen: Sequence[Any], rejected: Sequence[Any],
                            chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Keep a step's pairs and their implicit rewards as ``last_samples`` (read by the sample-table callback)."""
        self.last_samples = StepSamples({
            "prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected),
            "reward_chosen": chosen_rewards, "reward_rejected": rejected_rewards,
            "margin": chosen_rewards - rejected_rewards,
        })

    # ----------------------------------------------------------------------------- tokens
    def _prompt_messages(self, prompt: Prompt) -> list[dict[str, Any]]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def encode_response(self, prompt: Prompt, response: Any) -> list[int]:
        """Token ids of one response after ``prompt``, cut after the first EOS (EOS appended if absent).

        With a chat template the response is rendered as the assistant turn, so it carries the
        template's end-of-turn tokens; otherwise it is the plain text followed by EOS.
        """
        tok = self.tokenizer
        text = response_text(response)
        if text is None:
            raise ValueError(f"response {response!r} is neither a string nor a list of chat messages")
        roles = [] if isinstance(response, str) else [m.get("role") for m in response]
        if any(role != "assistant" for role in roles):
            raise ValueError(
                f"a response holds {roles} messages, but it is the assistant's reply only (a string or assistant "
                "messages): conversations that repeat the prompt's messages would train on them as model output. "
                "PreferenceDataModule splits such rows into prompt and final assistant message(s); with other data "
                "loaders, give the prompt and the reply apart."
            )
        templated = not isinstance(prompt, str) or bool(self.chat_template and tok.chat_template)
        if templated:
            head = render_prompt(tok, prompt, self.system_prompt, self.chat_template)
            turn = [{"role": "assistant", "content": text}] if isinstance(response, str) else list(response)
            full = tok.apply_chat_template(self._prompt_messages(prompt) + [dict(m) for m in turn], tokenize=False)
            if full.startswith(head) and len(full) > len(head):
                text = full[len(head):]
            elif not self._warned_template_fallback:
                self._warned_template_fallback = True
                log.warning("the chat template renders prompt + response as text that does not start with the "
                            "rendered prompt, so responses are tokenized as their plain text followed by EOS, without "
                            "the template's assistant-turn tokens (first for the prompt %r)", prompt)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        eos = set(self.eos_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        ids = ids[: cut + 1] if cut is not None else ids + [tok.eos_token_id]
        if self.max_completion_length is not None:
            ids = ids[: self.max_completion_length]
        return ids

    def tokenize(self, prompts: Sequence[Prompt], responses: Sequence[Any]) -> Sequences:
        """Pad prompts (left) and responses (right) into :class:`Sequences` on the module's device."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        prompt_ids = self.encode(prompts)
        completion_ids = [self.encode_response(p, r) for p, r in zip(prompts, responses)]
        pad = self.tokenizer.pad_token_id
        pi, pm = left_pad(prompt_ids, pad, self.device)
        ci, cm = right_pad(completion_ids, pad, self.device)
        return Sequences(pi, pm, ci, cm)

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise a ``KeyError`` naming the columns a training batch lacks (subclasses say which they need)."""

    def require_pair_columns(self, batch: Mapping[str, Any], fix: str) -> None:
        """Raise a ``KeyError`` naming the ``chosen``/``rejected`` columns ``batch`` lacks; ``fix`` ends the message."""
        missing = [c for c in ("chosen", "rejected") if c not in batch]
        if missing:
            needed = " and ".join(f"a {c!r} column" for c in missing)
            raise KeyError(f"{type(self).__name__} needs paired rows with {needed} (got columns {sorted(batch)}); "
                           f"{fix}")

    def paired_sequences(self, batch: Mapping[str, Any], fix: str) -> Sequences:
        """Chosen rows then rejected rows of a batch of pairs; ``fix`` completes the missing-column error."""
        self.require_pair_columns(batch, fix)
        prompts = list(batch["prompt"])
        return self.tokenize(prompts + prompts, list(batch["chosen"]) + list(batch["rejected"]))

    @override
    def packed_length_bound(self) -> int | None:
        """The prompt and response limits together (the pairs' responses are cut to ``max_completion_length``)."""
        limits = (self.max_prompt_length, self.max_completion_length)
        return None if None in limits else sum(limits)

    def token_logps(self, model: nn.Module, seqs: Sequences) -> torch.Tensor:
        """``[N, C]`` per-token log-probs (0 on padding) through the shared fused log-prob path (packed or not)."""
        return self.completion_token_logprobs(model, seqs.prompt_ids, seqs.prompt_mask, seqs.completion_ids,
                                              seqs.completion_mask, temperature=1.0)[0]

    def summed_logps(self, model: nn.Module, seqs: Sequences) -> torch.Tensor:
        """``[N]`` summed log-prob of each response."""
        return (self.token_logps(model, seqs) * seqs.completion_mask).sum(-1)

    def micro_batches(self, n: int) -> Iterator[torch.Tensor]:
        """Row indices ``[m]`` of each micro-batch of ``n`` rows."""
        for start in range(0, n, self.micro_batch_size):
            yield torch.arange(start, min(start + self.micro_batch_size, n), device=self.device)

    def pair_values(self, seqs: Sequences, losses: PairLosses, train: bool) -> dict[str, torch.Tensor]:
        """Per-pair values of ``losses`` over a batch of pairs (chosen rows, then rejected rows), by micro-batch.

        ``losses(sub, rows)`` gets the chosen and rejected sequences of the pairs ``rows`` and returns per-pair
        tensors, ``"loss"`` among them. With ``train``, each micro-batch's share of the batch's mean loss goes
        backward and one optimizer step follows (its ``grad_norm`` is added). Nothing is read back per micro-batch.
        """
        n = seqs.prompt_ids.shape[0] // 2
        values: dict[str, list[torch.Tensor]] = {}
        step_loss = torch.zeros((), device=self.device)
        for mb in self.micro_batches(n):
            parts = losses(seqs.rows(torch.cat([mb, mb + n])), mb)
            if train:
                loss = parts["loss"].sum() / n
                self.manual_backward(loss)
                step_loss = step_loss + loss.detach()
            for k, v in parts.items():
                values.setdefault(k, []).append(v.detach())
        out = {k: torch.cat(v) for k, v in values.items()}
        if train:
            out["grad_norm"] = torch.tensor(self.optimizer_step_checked(step_loss)["grad_norm"])
        return out
