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


def check_mini_batches(num_mini_batches: int, num_prompts: int, num_generations: int) -> None:
    """Raise when a full training batch of ``num_prompts`` prompts has fewer completions than ``num_mini_batches``.

    Each mini-batch needs a completion, so such a batch would make fewer optimizer steps than the module counts
    (and the run would stop at another step than ``max_steps`` says). The partial last batch of an epoch may be
    smaller and trains in as many mini-batches as it has completions.

    Raises:
        ValueError: naming both counts and the fix.
    """
    n = num_prompts * num_generations
    if num_mini_batches > n:
        raise ValueError(
            f"num_mini_batches={num_mini_batches} is more than the {n} completions of a training batch ({num_prompts} "
            f"prompts x num_generations={num_generations}), and each mini-batch needs at least one: set "
            f"num_mini_batches to at most {n}, or train on more prompts per batch (the data's batch_size, with at "
            "least as many training rows per process)"
        )
