"""Row dicts as batches of columns: the dataset, the collate function, and the loaders both DataModules share."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_rl.data.io import Rows
from lightning_rl.data.sampler import ResumableDataLoader


def column_names(rows: Rows) -> list[str]:
    """Every column of ``rows``, in the order of first appearance."""
    return list(dict.fromkeys(k for r in rows for k in r))


class RowsDataset(Dataset):
    """A list of row dicts as a map-style dataset; every row has every column (None where a row lacks one).

    So the columns of a batch, and those that reach the reward functions, never depend on which rows
    the shuffle puts in it.
    """

    def __init__(self, rows: Rows):
        self.rows = rows
        self.columns = column_names(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        if len(row) == len(self.columns):  # the row's keys are among the columns: it has them all
            return row
        return {k: row.get(k) for k in self.columns}


class NoRows(IterableDataset):
    """No rows and no length: the validation loader of a DataModule without validation data.

    Lightning then runs no validation batch and, since the loader has no length, does not warn that
    its length is zero (it would for an empty list or an empty ``DataLoader``).
    """

    def __iter__(self):
        return iter(())


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Turn row dicts into a dict of columns (lists, no tensors): each column of any row, None where a row lacks it."""
    return {k: [r.get(k) for r in rows] for k in column_names(rows)}


def rows_loader(rows: Rows, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                resumable: bool = False) -> DataLoader:
    """A DataLoader of column batches over ``rows``, seeded by torch's seed (never drawing on the global RNG).

    ``resumable``: a :class:`~lightning_rl.data.sampler.ResumableDataLoader` (a new order each epoch, its
    position saved in checkpoints), as training loaders are.
    """
    if resumable:
        return ResumableDataLoader(RowsDataset(rows), batch_size=batch_size, shuffle=shuffle,
                                   collate_fn=collate_rows, num_workers=num_workers)
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    return DataLoader(RowsDataset(rows), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_rows,
                      num_workers=num_workers, generator=gen)


class RowsDataModule(L.LightningDataModule):
    """Training and validation loaders over ``train_rows`` / ``val_rows``, filled by the subclass's ``setup``.

    Subclasses set ``batch_size``, ``val_batch_size``, ``shuffle`` and ``num_workers``.
    """

    train_rows: Rows | None
    val_rows: Rows | None
    batch_size: int
    val_batch_size: int
    shuffle: bool
    num_workers: int

    def train_dataloader(self) -> DataLoader:
        """Batches of training rows."""
        self.setup("fit")
        return rows_loader(self.train_rows, self.batch_size, self.shuffle, self.num_workers, resumable=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of held-out rows (a loader of no batches when there is no validation data)."""
        self.setup("validate")
        if not self.val_rows:
            return DataLoader(NoRows(), batch_size=None)
        return rows_loader(self.val_rows, self.val_batch_size, num_workers=self.num_workers)
