"""The random state of the process as plain data, so a resumed run samples what the uninterrupted one would.

Stored in checkpoints (loadable with ``torch.load(weights_only=True)``: tensors, lists and numbers
only) and put back when the resumed run starts training.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and every CUDA device), Python's ``random`` and numpy."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return out
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return out


def rng_states_of_every_process() -> list[dict[str, Any]] | None:
    """:func:`rng_states` of every process, in rank order; None with one process.

    A collective: every process of the default group calls it (Lightning saves checkpoints on all of them). Seeded
    apart, or sampling completions of other lengths, the processes' states differ, and one checkpoint written by
    the first process has to hold them all for each to resume where it stopped.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world == 1:
        return None
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, rng_states())
    return states


def rng_states_for(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """The random states process ``rank`` of ``world_size`` resumes with, from a checkpoint's resume state.

    Its own, when the checkpoint holds every process's (:func:`rng_states_of_every_process`) and the run has as
    many processes as the one that wrote it. With a different count no process can resume the old sampling:
    None, so each keeps the state it was seeded with (the processes stay apart, as they would be started). A
    checkpoint of one process, or of a release before the states of every process were kept, has the first
    process's state only, which every process takes, as before.
    """
    every = saved.get("rng_per_process")
    if every is None:
        return saved.get("rng")
    return every[rank] if len(every) == world_size else None


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back the random states :func:`rng_states` returned (parts this process cannot take are skipped)."""
    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in states:
        import numpy as np

        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@contextmanager
def training_rng_kept() -> Generator[None, None, None]:
    """Run the block (validation's sampling and scoring) without moving the training's random states.

    Without it a validation pass would draw from the states the next training steps sample with, so a run with
    validation would sample other completions than one without, and a run resumed from a checkpoint saved
    before a validation pass (which it does not replay) would differ from the uninterrupted run.
    """
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
