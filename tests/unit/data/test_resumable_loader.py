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


def test_seeds_give_unrelated_orders_not_shifted_epochs():
    """With ``seed + epoch`` seed s at epoch e replayed seed s+1 at epoch e-1; (seed, epoch) is hashed now."""
    rows = [{"i": i} for i in range(50)]
    orders = {(s, e): epoch(loader(seed=s, rows=rows, batch_size=50), e)[0] for s in range(3) for e in range(3)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)
    assert epoch(loader(seed=1, rows=rows, batch_size=50), 2)[0] == orders[(1, 2)]  # still fixed by (seed, epoch)


def test_the_default_seed_is_torchs_seed_in_one_process():
    torch.manual_seed(1234)
    assert ResumableDataLoader(RowsDataset(ROWS)).sampler.seed == 1234
    assert epoch(ResumableDataLoader(RowsDataset(ROWS), batch_size=3, shuffle=True, collate_fn=collate_rows), 1) \
        == epoch(loader(seed=1234), 1)


class _TwoRanks:
    """``torch.distributed`` as rank ``rank`` of 2 sees it; the broadcast hands out rank 0's value."""

    def __init__(self, rank, rank0_value):
        self.rank, self.rank0_value, self.broadcasts = rank, rank0_value, 0

    def patch(self, monkeypatch):
        from lightning_rl.data import sampler

        monkeypatch.setattr(sampler.dist, "is_available", lambda: True)
        monkeypatch.setattr(sampler.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(sampler.dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(sampler.dist, "get_rank", lambda group=None: self.rank)
        monkeypatch.setattr(sampler.dist, "broadcast_object_list", self.broadcast)

    def broadcast(self, objects, src=0, group=None, device=None):
        assert src == 0
        self.broadcasts += 1
        if self.rank != 0:
            objects[0] = self.rank0_value


def test_ranks_without_a_common_seed_shuffle_alike_and_share_each_epoch(monkeypatch):
    """Without seed_everything each process has its own torch seed; every rank must use rank 0's."""
    rows = [{"i": i} for i in range(16)]
    seen = {}
    for rank, own_seed in ((0, 111), (1, 222)):
        with monkeypatch.context() as m:
            ranks = _TwoRanks(rank, rank0_value=111)
            ranks.patch(m)
            torch.manual_seed(own_seed)
            dl = ResumableDataLoader(RowsDataset(rows), batch_size=4, shuffle=True, collate_fn=collate_rows)
            assert dl.sampler.seed == 111 and ranks.broadcasts == 1
            seen[rank] = [i for e in range(2) for b in epoch(dl, e) for i in b]
            ResumableDataLoader(RowsDataset(rows), batch_size=4, seed=5)  # an explicit seed needs no broadcast
            assert ranks.broadcasts == 1
    for e in range(2):
        shares = [seen[r][8 * e: 8 * e + 8] for r in (0, 1)]
        assert sorted(shares[0] + shares[1]) == list(range(16))  # every row once per epoch, no duplicates
