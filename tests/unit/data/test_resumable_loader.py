"""The training loader: a new order every epoch, and a position that survives a checkpoint."""

import pytest
import torch

from lightning_rl.data.rows import RowsDataset, collate_rows
from lightning_rl.data.sampler import ResumableDataLoader

ROWS = [{"i": i} for i in range(10)]


def loader(seed=0, shuffle=True, rows=ROWS, batch_size=3):
    return ResumableDataLoader(RowsDataset(rows), batch_size=batch_size, shuffle=shuffle, seed=seed,
                               collate_fn=collate_rows)


def epoch(dl, e):
    dl.sampler.set_epoch(e)
    return [b["i"] for b in dl]


def test_each_epoch_is_a_new_permutation_fixed_by_seed():
    dl = loader()
    e0, e1 = epoch(dl, 0), epoch(dl, 1)
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(10))
    assert e0 != e1  # epoch 1 does not replay epoch 0
    assert epoch(loader(), 1) == e1 and epoch(loader(seed=1), 0) != e0
    assert epoch(loader(shuffle=False), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_a_fresh_loader_continues_mid_epoch_from_the_state():
    dl = loader()
    dl.sampler.set_epoch(2)
    it = iter(dl)
    seen = [next(it)["i"], next(it)["i"]]
    state = dl.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 2
    rest = [b["i"] for b in it]
    torch.manual_seed(99)  # the global RNG plays no part
    fresh = loader(seed=7)  # the seed comes from the state
    fresh.load_state_dict(state)
    assert [b["i"] for b in fresh] == rest and seen + rest == epoch(loader(), 2)
    assert fresh.state_dict()["batches"] == 4
    assert epoch(fresh, 2) == seen + rest  # the skip applies once


def test_a_finished_epoch_resumes_at_the_next_one():
    dl = loader()
    epoch(dl, 0)
    fresh = loader(seed=5)
    fresh.load_state_dict(dl.state_dict())
    assert fresh.sampler.epoch == 1 and [b["i"] for b in fresh] == epoch(loader(), 1)


def test_other_data_is_refused_with_the_fix():
    state = loader().state_dict()
    with pytest.raises(ValueError, match=r"had 10 rows per process in batches of 3, this run has 8 .*same data"):
        loader(rows=ROWS[:8]).load_state_dict(state)
