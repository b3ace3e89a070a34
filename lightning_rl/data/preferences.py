"""The preference DataModule: paired rows (prompt, chosen, rejected) for DPO/ORPO, unpaired rows for KTO."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch.utils.data import DataLoader

from lightning_rl.data.io import Rows
from lightning_rl.data.prompts import DataSource, validate_prompt_rows
from lightning_rl.data.rows import RowsDataModule, rows_loader
from lightning_rl.data.sources import load_rows

log = logging.getLogger(__name__)

Mode = Literal["paired", "unpaired"]
OnInvalid = Literal["error", "skip"]


class InvalidPreferenceError(ValueError):
    """A preference row cannot be trained on (empty response, identical chosen and rejected, bad label)."""


def read_preference_rows(source: DataSource | Any, split: str = "train", subset: str | None = None) -> Rows:
    """Rows of any source :func:`~lightning_rl.data.sources.load_rows` takes (``hf:`` names load ``split``)."""
    return load_rows(source, split, subset)


def _is_messages(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of chat messages (mappings)."""
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(m, Mapping) for m in value))


def response_text(response: Any) -> str | None:
    """The text of a response (a string, or assistant messages whose contents are joined); None if malformed.

    Conversations that also hold the prompt's messages are split by :func:`split_conversation` first.
    """
    if isinstance(response, str):
        return response
    if _is_messages(response):
        parts = [m.get("content") for m in response]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


CONVERSATION_LAYOUTS = (
    "Expected layouts: chosen/rejected (or completion) are strings or the assistant message(s) that answer the "
    "prompt; or they are whole conversations that start with the prompt's messages (the prompt column as one user "
    "turn, or the same message list) and end with the assistant reply; or, with no prompt column, conversations "
    "that share their leading messages (which become the prompt) and end with different assistant replies"
)
_OUTPUT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "index", "kl_completion")


def _same_message(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal messages, ignoring keys set to None (a ``datasets`` struct column fills missing keys with None)."""
    return ({k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None})


def _same_messages(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return len(a) == len(b) and all(_same_message(x, y) for x, y in zip(a, b))


def _roles(messages: Sequence[Mapping[str, Any]]) -> str:
    return "[" + ", ".join(str(m.get("role")) for m in messages) + "]"


def split_conversation(prompt: Any, responses: Sequence[Any], has_prompt: bool = True) -> tuple[Any, list[Any]] | str:
    """Split responses that repeat the conversation into ``(prompt, final assistant message(s) of each)``.

    A response that is a list of messages with a non-assistant message (the UltraFeedback-binarized or
    Anthropic-HH layout: ``[{"role": "user", ...}, {"role": "assistant", ...}]``) is split after its last
    non-assistant message. The leading messages must be the same for every response and must be the
    prompt: its messages, or (a string prompt) a conversation whose last user turn is the prompt, which
    then becomes the prompt. Without a prompt (``has_prompt=False``) the leading messages are the prompt.
    Responses that are strings or assistant messages only are returned unchanged.

    Returns:
        ``(prompt, responses)``, or the text of the problem.
    """
    heads, tails = [], []
    for r in responses:
        cut = 0
        if _is_messages(r):
            cut = max((j + 1 for j, m in enumerate(r) if m.get("role") != "assistant"), default=0)
        heads.append(list(r[:cut]) if cut else [])
        tails.append(r[cut:] if cut else r)
    if not any(heads):
        return prompt, list(responses)
    head = next(h for h in heads if h)
    if not all(_same_messages(h, head) for h in heads):
        return (f"the responses continue different conversations (leading messages {' vs '.join(map(_roles, heads))}"
                "), so they do not answer the same prompt")
    if not all(_is_messages(t) for t in tails):
        return (f"a response conversation {_roles(head)} ends with a non-assistant message: there is no assistant "
                "reply to train on")
    if not has_prompt:
        return head, tails
    if not isinstance(prompt, str) and not _is_messages(prompt):
        return prompt, list(responses)  # a malformed prompt: refused by validate_prompt_rows
    own = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if _same_messages(head, own):
        return prompt, tails
    last = head[-1]
    if isinstance(prompt, str) and last.get("role") == "user" and last.get("content") == prompt:
        return head, tails  # the conversation around the prompt (a system message, earlier turns) is the prompt
    return (f"the responses are conversations whose leading messages {_roles(head)} are not the prompt's "
            f"messages {_roles(own)} (or differ in content)")


def _check_response(value: Any, column: str, i: int, where: str) -> str | None:
    """Problem text for a response value, or None when it is usable."""
    text = response_text(value)
    if text is None:
        return (f"row {i} of the {where} dataset has {column}={value!r}: a response is a string or a list of chat "
                "messages ({'role': 'assistant', 'content': ...})")
    if not text.strip():
        return f"row {i} of the {where} dataset has an empty {column!r} response"
    return None


def _label(value: Any, i: int, column: str, where: str) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return (f"row {i} of the {where} dataset has {column}={value!r}: the label must be true (desirable) or "
            "false (undesirable)")


def kl_partners(n: int, seed: int = 0) -> list[int]:
    """For each row, another row whose completion is paired with its prompt for KTO's KL estimate.

    A seeded random single cycle: no row is its own partner (for ``n >= 2``) and every
    completion is used once, so the estimate is cacheable by row index.
    """
    if n < 2:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for j, row in enumerate(order):
        partner[row] = order[(j + 1) % n]
    return partner


class PreferenceDataModule(RowsDataModule):
    """Preference data for DPO, ORPO (``mode="paired"``) and KTO (``mode="unpaired"``).

    Paired rows hold ``prompt``, ``chosen`` and ``rejected``; unpaired rows hold ``prompt``,
    ``completion`` and ``label`` (true = desirable). In ``unpaired`` mode a paired row is split
    into one desirable and one undesirable row, so both kinds of data can be mixed. Prompts and
    responses are strings or chat-message lists. Responses that hold the whole conversation (the
    UltraFeedback-binarized and Anthropic-HH layouts: the prompt's user turn, then the assistant
    reply) are split: their leading messages must be the prompt's (or, with no prompt column, are the
    same in chosen and rejected and become the prompt), and the final assistant message(s) are the
    response; other layouts are refused (see :func:`split_conversation`). Each batch
    is a dict of columns plus ``index`` (the row's position, used to cache reference
    log-probs) and, unpaired, ``kl_completion`` (another row's completion, for KTO's KL estimate).

    A renamed column (``prompt_column="question"``) wins over a column of the data that has the
    output's name (``prompt``): that one is dropped.

    Invalid rows (an empty response, identical chosen and rejected, a bad label, a conversation that does
    not start with the prompt) raise
    :class:`InvalidPreferenceError` by default; with ``on_invalid="skip"`` they are dropped with
    one warning that counts them. A missing column always raises ``KeyError``.

    Args:
        train_data: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` path or glob, a list of dicts, a Hugging
            Face ``Dataset`` or ``DatasetDict``, or ``"hf:<dataset name or folder>"`` (see
            :func:`~lightning_rl.data.sources.load_rows`; CSV, globs and ``hf:`` need ``datasets``).
        val_data: optional held-out rows, same forms.
        mode: ``paired`` (DPO, ORPO) or ``unpaired`` (KTO).
        prompt_column: column with the prompt.
        chosen_column: column with the preferred response.
        rejected_column: column with the dispreferred response.
        completion_column: column with the completion of unpaired rows.
        label_column: column with the desirable (true) / undesirable (false) label of unpaired rows.
        train_split: split loaded for ``"hf:..."`` training data.
        val_split: split loaded for ``"hf:..."`` validation data.
        subset: configuration (subset) of ``"hf:..."`` data.
        batch_size: pairs (or unpaired rows) per training step.
        val_batch_size: rows per validation batch (defaults to ``batch_size``).
        shuffle: shuffle the training rows every epoch.
        num_workers: DataLoader workers.
        on_invalid: ``error`` or ``skip`` for unusable rows.
        seed: seed of the KL partner assignment (unpaired mode).
    """

    def __init__(
        self,
        train_data: DataSource | None = None,
        val_data: DataSource | None = None,
        mode: Mode = "paired",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        completion_column: str = "completion",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str = "test",
        subset: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        on_invalid: OnInvalid = "error",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("paired", "unpaired"):
            raise ValueError(f"mode must be 'paired' (DPO, ORPO) or 'unpaired' (KTO), got {mode!r}")
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_data, self.val_data = train_data, val_data
        self.mode = mode
        self.prompt_column, self.chosen_column, self.rejected_column = prompt_column, chosen_column, rejected_column
        self.completion_column, self.label_column = completion_column, label_column
        self.train_split, self.val_split, self.subset = train_split, val_split, subset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.on_invalid = on_invalid
        self.seed = seed
        self.train_rows: Rows | None = None
        self.val_rows: Rows | None = None

    # ----------------------------------------------------------------------------- rows
    def load_train_rows(self) -> Rows:
        """Raw rows of the training split (override to generate data)."""
        if self.train_data is None:
            raise ValueError("PreferenceDataModule needs train_data= (a .jsonl/.json/.parquet path, a list of dicts, "
                             "a datasets.Dataset or 'hf:<name>')")
        return read_preference_rows(self.train_data, self.train_split, self.subset)

    def load_val_rows(self) -> Rows | None:
        """Raw rows of the validation split, if any."""
        return None if self.val_data is None else read_preference_rows(self.val_data, self.val_split, self.subset)

    def _is_paired(self, row: Mapping[str, Any]) -> bool:
        return self.chosen_column in row or self.rejected_column in row

    def _require(self, row: Mapping[str, Any], columns: Sequence[tuple[str, str]], i: int, where: str) -> None:
        for col, arg in columns:
            if col not in row:
                raise KeyError(
                    f"row {i} of the {where} dataset has no {col!r} column (columns: {sorted(row)}); "
                    f"set {arg}= to the column that holds it"
                )

    def _split_conversations(self, rows: Rows, where: str) -> tuple[Rows, dict[int, str]]:
        """Rows whose conversation responses are split into prompt + reply, and the problem of each row that fails.

        A failing row keeps its place (so later messages number rows as given) with a stand-in prompt when it
        has none; the row is refused in :meth:`normalize`.
        """
        out: Rows = []
        problems: dict[int, str] = {}
        for i, r in enumerate(rows):
            columns = [self.chosen_column, self.rejected_column] if self._is_paired(r) else [self.completion_column]
            columns = [c for c in columns if c in r]
            has_prompt = r.get(self.prompt_column) is not None
            if not any(_is_messages(r[c]) and any(m.get("role") != "assistant" for m in r[c]) for c in columns):
                out.append(r)
                continue
            result = split_conversation(r.get(self.prompt_column), [r[c] for c in columns], has_prompt)
            if isinstance(result, str):
                problems[i] = (f"row {i} of the {where} dataset: {result}. {CONVERSATION_LAYOUTS}")
                out.append(r if has_prompt else {**r, self.prompt_column: "?"})
                continue
            prompt, responses = result
            out.append({**r, self.prompt_column: prompt, **dict(zip(columns, responses))})
        return out, problems

    def normalize(self, rows: Rows, where: str) -> Rows:
        """Check rows and rename their columns to ``prompt``/``chosen``/``rejected`` (or ``completion``/``label``).

        Raises:
            KeyError: a required column is missing.
            InvalidPreferenceError: an unusable row while ``on_invalid="error"``.
        """
        rows, split_problems = self._split_conversations(rows, where)
        validate_prompt_rows(rows, self.prompt_column, where)
        out: Rows = []
        problems: list[str] = []
        renamed = {self.prompt_column, self.chosen_column, self.rejected_column, self.completion_column,
                   self.label_column}
        dropped: set[str] = set()
        for i, r in enumerate(rows):
            extras = {k: v for k, v in r.items() if k not in renamed and k not in _OUTPUT_COLUMNS}
            dropped.update(k for k in r if k not in renamed and k in _OUTPUT_COLUMNS[:5])
            paired = self._is_paired(r)
            if paired:
                self._require(r, [(self.chosen_column, "chosen_column"), (self.rejected_column, "rejected_column")],
                              i, where)
            elif self.mode == "paired":
                if self.completion_column in r and self.label_column in r:  # a KTO row: labelled, not paired
                    raise KeyError(
                        f"row {i} of the {where} dataset is unpaired ({self.completion_column!r} and "
                        f"{self.label_column!r} columns, no {self.chosen_column!r}): DPO and ORPO train on pairs. "
                        "Train it with KTO and PreferenceDataModule(mode='unpaired'), or give chosen/rejected "
                        "columns (chosen_column=, rejected_column=)"
                    )
                self._require(r, [(self.chosen_column, "chosen_column")], i, where)
            else:
                self._require(r, [(self.completion_column, "completion_column"), (self.label_column, "label_column")],
                              i, where)
            if i in split_problems:
                problems.append(split_problems[i])
                continue
            if paired:
                problem = (_check_response(r[self.chosen_column], "chosen", i, where)
                           or _check_response(r[self.rejected_column], "rejected", i, where))
                if problem is None and response_text(r[self.chosen_column]) == response_text(r[self.rejected_column]):
                    problem = (f"row {i} of the {where} dataset has identical chosen and rejected responses, "
                               "which carry no preference")
                if problem:
                    problems.append(problem)
                    continue
                prompt = r[self.prompt_column]
                if self.mode == "paired":
                    out.append({**extras, "prompt": prompt, "chosen": r[self.chosen_column],
                                "rejected": r[self.rejected_column]})
                else:
                    out.append({**extras, "prompt": prompt, "completion": r[self.chosen_column], "label": True})
                    out.append({**extras, "prompt": prompt, "completion": r[self.rejected_column], "label": False})
                continue
            label = _label(r[self.label_column], i, self.label_column, where)
            problem = label if isinstance(label, str) else _check_response(r[self.completion_column], "completion",
                                                                         i, where)
            if problem:
                problems.append(problem)
                continue
            out.append({**extras, "prompt": r[self.prompt_column], "completion": r[self.completion_column],
                        "label": label})
        if dropped:
            log.info("dropped the %s column(s) of the %s dataset: the renamed columns (prompt_column=%r, ...) take "
                     "their names", sorted(dropped), where, self.prompt_column)
        if problems:
            if self.on_invalid == "error":
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise InvalidPreferenceError(
                    f"{problems[0]}{more}. Fix or remove such rows, or pass on_invalid='skip' to drop them."
                )
            log.warning("dropped %d unusable rows of the %s dataset, the first: %s", len(problems), where, problems[0])
        if not out:
            raise InvalidPreferenceError(f"the {where} dataset has no usable rows left ({len(problems)} dropped)")
        partners = kl_partners(len(out), self.seed) if self.mode == "unpaired" else None
        for i, row in enumerate(out):
            row["index"] = i
            if partners is not None:
                row["kl_completion"] = out[partners[i]]["completion"]
        return out

    def setup(self, stage: str | None = None) -> None:
        """Read and check the data once."""
        if self.train_rows is None:
            self.train_rows = self.normalize(self.load_train_rows(), "training")
        if self.val_rows is None:
            val = self.load_val_rows()
            self.val_rows = None if val is None else self.normalize(val, "validation")

    def label_counts(self) -> tuple[int, int]:
        """``(desirable, undesirable)`` training rows (unpaired mode)."""
        self.setup("fit")
        labels = [bool(r["label"]) for r in self.train_rows if "label" in r]
        return sum(labels), len(labels) - sum(labels)

    # ----------------------------------------------------------------------------- loaders
    def reference_dataloader(self, split: Literal["train", "val"]) -> DataLoader | None:
        """Every row of ``split`` once, in order (for precomputing reference log-probs); None if absent."""
        self.setup("fit")
        rows = self.train_rows if split == "train" else self.val_rows
        if not rows:
            return None
        return rows_loader(rows, self.val_batch_size)
