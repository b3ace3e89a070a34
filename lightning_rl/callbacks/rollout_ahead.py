"""The next batch's rollout, generated in a background thread while the current batch trains.

:class:`~lightning_rl.callbacks.VLLMRollout` with ``overlap`` starts the next batch's generation before the
current batch's update and picks it up at the next batch: the update and the engine (in a process of its own)
run at once, and the rollout is one optimizer step old when it trains, which the module's truncated importance
weights correct (engine log-probs against the trainer's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lightning_rl.rollout.engine import Rollout


@dataclass
class PendingRollout:
    """A rollout being generated: the prompts it answers and the optimizer step whose weights generate it."""

    prompts: list[Any]
    weights_step: int
    future: Future[Rollout]


class RolloutAhead:
    """At most one rollout generated ahead, in one background thread.

    Attributes:
        last_generate_s: how long the rollout :meth:`take` returned last took to generate in the background.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self.pending: PendingRollout | None = None
        self.last_generate_s = 0.0

    def submit(self, prompts: Sequence[Any], weights_step: int, generate: Callable[[], Rollout]) -> None:
        """Start ``generate()`` for ``prompts`` in the background (the engine must not be used until it ends)."""
        if self.pending is not None:
            raise RuntimeError("a rollout is already being generated ahead; take it first")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-rl-rollout")
        self.pending = PendingRollout(list(prompts), weights_step, self._pool.submit(_timed, generate))

    def take(self, prompts: Sequence[Any]) -> tuple[Rollout, int] | None:
        """Wait for the pending rollout; ``(rollout, weights step)`` when it answers ``prompts``, else None.

        A rollout for other prompts (the data changed order, an epoch ended) is dropped. An error raised while
        generating is raised here.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        rollout, self.last_generate_s = pending.future.result()
        if pending.prompts != list(prompts):
            return None
        return rollout, pending.weights_step

    def generating(self) -> bool:
        """Whether a rollout is being generated now (submitted and not finished)."""
        return self.pending is not None and not self.pending.future.done()

    def wait(self) -> None:
        """Wait until the pending rollout (if any) is generated, keeping it (and its error) for :meth:`take`."""
        if self.pending is not None:
            futures.wait([self.pending.future])

    def drop(self) -> None:
        """Wait for a pending rollout and drop it (its errors too): the engine is free afterwards."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.future.exception()

    def close(self) -> None:
        """:meth:`drop`, then stop the thread."""
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _timed(generate: Callable[[], Rollout]) -> tuple[Rollout, float]:
    t0 = time.perf_counter()
    rollout = generate()
    return rollout, time.perf_counter() - t0


_EMPTY, _END = object(), object()


class PeekableBatches:
    """The training loop's batch iterator with a look at the next batch before the loop takes it.

    Lightning fetches ahead only for data of unknown length; with a sized loader this wrapper takes the next batch
    early and hands it to the loop when the loop asks. A loader that counts the batches it gave for resuming
    (:class:`~lightning_rl.data.ResumableDataLoader`'s ``batches_given``) is told the peeked batch is not given yet,
    so a checkpoint saved in between resumes at the batch the loop would have trained next.
    """

    def __init__(self, iterator: Any, loaders: Sequence[Any] = ()) -> None:
        self._it, self._loaders, self._held = iterator, list(loaders), _EMPTY

    def __iter__(self) -> PeekableBatches:
        return self

    def __next__(self) -> Any:
        held, self._held = self._held, _EMPTY
        if held is _EMPTY:
            return next(self._it)
        if held is _END:
            raise StopIteration
        self._count(+1)
        return held

    def peek(self) -> Any:
        """The next item (None at the end), without taking it from the loop."""
        if self._held is _EMPTY:
            try:
                self._held = next(self._it)
                self._count(-1)
            except StopIteration:
                self._held = _END
        return None if self._held is _END else self._held

    def _count(self, delta: int) -> None:
        for loader in self._loaders:
            if isinstance(getattr(loader, "batches_given", None), int):
                loader.batches_given += delta


def _prompts_of(item: Any) -> list[Any] | None:
    batch = item[0] if isinstance(item, tuple) else item  # the loop's items are (batch, batch_idx, dataloader_idx)
    if isinstance(batch, dict) and "prompt" in batch:
        return list(batch["prompt"])
    return None


def next_batch_prompts(trainer: Any, batch_idx: int, steps_per_batch: int = 1) -> list[Any] | None:
    """The prompts of the batch the trainer trains after ``batch_idx``, read before the training loop takes it.

    None at the end of an epoch or of the run (``max_steps``, counted in optimizer steps: ``steps_per_batch`` of
    them each training batch, ``limit_train_batches``), or with a loop that does not fetch batches through
    Lightning's usual fetcher.
    """
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps >= 0 and trainer.global_step + max(steps_per_batch, 1) >= max_steps:
        return None
    num_batches = getattr(trainer, "num_training_batches", None)
    if isinstance(num_batches, int) and batch_idx + 1 >= num_batches:
        return None
    fit_loop = getattr(trainer, "fit_loop", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "batches"):  # not Lightning's prefetching fetcher
        return None
    if fetcher.batches:  # Lightning fetched it already (data of unknown length)
        return _prompts_of(fetcher.batches[0])
    if getattr(fetcher, "done", True) or getattr(fetcher, "iterator", None) is None:
        return None
    if not isinstance(fetcher.iterator, PeekableBatches):  # a new iterator every epoch
        loaders = getattr(getattr(fit_loop, "_combined_loader", None), "flattened", ())
        fetcher.iterator = PeekableBatches(fetcher.iterator, loaders)
    item = fetcher.iterator.peek()
    return None if item is None else _prompts_of(item)


__all__ = ["PeekableBatches", "PendingRollout", "RolloutAhead", "next_batch_prompts"]
