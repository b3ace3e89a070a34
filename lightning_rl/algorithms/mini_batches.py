"""Splitting one rollout into the mini-batches of its optimizer steps."""

from __future__ import annotations


def mini_batch_bounds(n: int, num_mini_batches: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of ``num_mini_batches`` near-equal, non-empty mini-batches of ``n`` rows.

    Sizes differ by at most one row, so a batch that does not divide evenly (the partial last batch of
    an epoch, say) still trains. With fewer rows than mini-batches, each row is its own mini-batch.
    """
    if n < 1:
        raise ValueError(f"a rollout needs at least one completion to train on, got {n}")
    if num_mini_batches < 1:
        raise ValueError(f"num_mini_batches must be >= 1, got {num_mini_batches}")
    k = min(num_mini_batches, n)
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]
