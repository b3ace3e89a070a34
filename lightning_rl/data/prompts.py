"""The prompt DataModule: batches of prompts plus the dataset's other columns for the rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_rl.data.io import Rows
from lightning_rl.data.rows import RowsDataModule
from lightning_rl.data.sources import load_rows

DataSource = str | Path | Sequence[Mapping[str, Any]]


def validate_prompt_rows(rows: Rows, prompt_column: str, where: str) -> None:
    """Refuse an empty dataset or rows without a usable prompt, naming the fix.

    An empty dataset names the argument that gave it (``train_data`` or ``val_data``), so that the CLI points at
    that key, not at ``prompt_column``.
    """
    if not rows:
        source = "val_data" if where == "validation" else "train_data"
        raise ValueError(f"the {where} dataset is empty: `{source}` gave no rows; give it at least one row with a "
                         f"{prompt_column!r} column")
    for i, r in enumerate(rows):
        if prompt_column not in r:
            raise KeyError(
                f"row {i} of the {where} dataset has no {prompt_column!r} column (columns: {sorted(r)}); "
                f"set prompt_column= to the column that holds the prompts"
            )
        p = r[prompt_column]
        ok = isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, Mapping) for m in p))
        if not ok or not p:
            raise ValueError(
                f"row {i} of the {where} dataset has prompt {p!r}: a prompt is a non-empty string or a "
                "list of chat messages ({'role': ..., 'content': ...})"
            )


class PromptDataModule(RowsDataModule):
    """Prompts for on-policy RL (GRPO, PPO, online DPO).

    Each batch is a dict of columns: ``prompt`` (renamed from ``prompt_column``) plus every other
    column of the data, which the modules pass to the reward functions.

    Args:
        train_data: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` path or glob, a list of dicts, a Hugging
            Face ``Dataset`` or ``DatasetDict``, or ``"hf:<dataset name or folder>"`` (see
            :func:`~lightning_rl.data.sources.load_rows`; CSV, globs and ``hf:`` need ``datasets``).
        val_data: optional held-out prompts, same forms.
        prompt_column: column holding the prompt (a string or a list of chat messages). When it is not
            ``prompt``, it becomes the ``prompt`` column and a column already named ``prompt`` is dropped.
        train_split: split loaded for ``"hf:..."`` training data (and of a ``DatasetDict``).
        val_split: split loaded for ``"hf:..."`` validation data.
        subset: configuration (subset) of ``"hf:..."`` data, e.g. ``main`` for ``openai/gsm8k``.
        batch_size: prompts per training step (each gets ``num_generations`` completions).
        val_batch_size: prompts per validation batch (defaults to ``batch_size``).
        shuffle: shuffle the training prompts every epoch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train_data: DataSource | None = None,
        val_data: DataSource | None = None,
        prompt_column: str = "prompt",
        train_split: str = "train",
        val_split: str = "test",
        subset: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_data = train_data
        self.val_data = val_data
        self.prompt_column = prompt_column
        self.train_split, self.val_split, self.subset = train_split, val_split, subset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.train_rows: Rows | None = None
        self.val_rows: Rows | None = None

    def load_train_rows(self) -> Rows:
        """Rows of the training split (override to generate data)."""
        if self.train_data is None:
            raise ValueError("PromptDataModule needs train_data= (a .jsonl/.json/.parquet/.csv path or glob, a list of "
                             "dicts, a datasets.Dataset or 'hf:<name>')")
        return load_rows(self.train_data, self.train_split, self.subset)

    def load_val_rows(self) -> Rows | None:
        """Rows of the validation split, if any."""
        return None if self.val_data is None else load_rows(self.val_data, self.val_split, self.subset)

    def _normalize(self, rows: Rows, where: str) -> Rows:
        validate_prompt_rows(rows, self.prompt_column, where)
        if self.prompt_column == "prompt":
            return rows
        # the renamed column wins: a column already named "prompt" is dropped, never passed on as the prompt
        return [{"prompt": r[self.prompt_column],
                 **{k: v for k, v in r.items() if k not in (self.prompt_column, "prompt")}} for r in rows]

    def setup(self, stage: str | None = None) -> None:
        """Read and check the data once."""
        if self.train_rows is None:
            self.train_rows = self._normalize(self.load_train_rows(), "training")
        if self.val_rows is None:
            val = self.load_val_rows()
            self.val_rows = None if val is None else self._normalize(val, "validation")
