"""A training loader that resumes mid-epoch: a new shuffle order per epoch and its position in checkpoints.

Lightning saves the ``state_dict()`` of a training dataloader that has one in ``fit_loop`` state
and hands it back through ``load_state_dict`` when a run resumes from a checkpoint. The order of
an epoch depends only on ``(seed, epoch)``, so a resumed run sees the rest of the interrupted
epoch, and later epochs, exactly as an uninterrupted run would. The two are hashed together, so
the orders of different seeds are unrelated (seed ``s`` at epoch ``e`` is not seed ``s + 1`` at
epoch ``e - 1``). Under a process group every rank shuffles with rank 0's seed, so the ranks'
shares of an epoch never overlap.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle: a hash of ``(seed, epoch)`` (a 63-bit int), so seeds give unrelated orders."""
    digest = hashlib.blake2b(f"lightning-rl/{int(seed)}/{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def shared_seed() -> int:
    """The shuffle seed: torch's seed (``seed_everything``'s, if called), the same on every rank.

    Under an initialized process group of several processes, rank 0's seed is broadcast: without
    ``seed_everything`` each process has its own random ``torch.initial_seed()``, and ranks that
    shuffle with different seeds would see overlapping shares of an epoch. Every rank must call
    this (as every rank builds its training loader under Lightning).
    """
    seed = torch.initial_seed() % 2**63
    world, _ = _world()
    if world > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


class ResumableSampler(DistributedSampler):
    """The share of an epoch's order for this process (shuffled from ``(seed, epoch)``), able to start mid-epoch.

    A :class:`~torch.utils.data.DistributedSampler` (one replica outside a process group), so
    Lightning keeps it under DDP instead of replacing it.

    Args:
        dataset: the map-style dataset.
        shuffle: a new random order every epoch; else the dataset's order.
        seed: seed of the shuffle (the same on every rank).
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, indices already seen in it)

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next iteration over ``epoch`` skip its first ``start`` indices."""
        self.set_epoch(epoch)
        self._resume = (epoch, start) if start else None

    def pending_start(self) -> int:
        """Indices the next iteration skips (0 unless resuming in the current epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def epoch_indices(self) -> list[int]:
        """The share of the current epoch's order for this process (padded or cut as ``DistributedSampler`` does)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        elif self.total_size > n:
            indices = (indices * math.ceil(self.total_size / n))[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start = self.pending_start()
        self._resume = None
        return iter(self.epoch_indices()[start:])


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a :class:`ResumableSampler` that counts the batches it gave.

    Its ``state_dict`` (epoch, batches given in that epoch, seed) goes into Lightning checkpoints;
    ``load_state_dict`` makes the next iteration continue after those batches. Its own random
    generator keeps iteration from drawing on the global torch RNG.

    ``seed`` defaults to :func:`shared_seed` (torch's seed, rank 0's under a process group).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int | None = None,
                 **kwargs: Any) -> None:
        sampler = kwargs.pop("sampler", None)
        if not isinstance(sampler, ResumableSampler):
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=shared_seed() if seed is None else seed)
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_given = 0

    def __iter__(self) -> Iterator[Any]:
        return self._counted()

    def _counted(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        self.batches_given = sampler.pending_start() // self.batch_size
        for batch in super().__iter__():
            self.batches_given += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches given in it, and the shuffle seed."""
        return {"epoch": self.sampler.epoch, "batches": self.batches_given, "seed": self.sampler.seed,
                "batch_size": self.batch_size, "num_samples": self.sampler.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches ``state`` counts (the next epoch if that one was finished)."""
        sampler: ResumableSampler = self.sampler
        if state.get("num_samples", sampler.num_samples) != sampler.num_samples or \
                state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"the checkpoint's training data had {state.get('num_samples')} rows per process in batches of "
                f"{state.get('batch_size')}, this run has {sampler.num_samples} in batches of {self.batch_size}: "
                "resume with the same data and batch_size (or start a new run from the weights with "
                "Module.load_from_checkpoint)"
            )
        sampler.seed = int(state["seed"])
        epoch, start = int(state["epoch"]), int(state["batches"]) * self.batch_size
        if start >= sampler.num_samples:
            epoch, start = epoch + 1, 0
        sampler.resume_at(epoch, start)
        self.batches_given = start // self.batch_size
