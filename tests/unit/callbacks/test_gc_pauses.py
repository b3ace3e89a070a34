"""Objects alive after the first training step leave the garbage collector's walks until the fit ends or fails."""

import gc

import lightning as L
import pytest
from helpers import make_trainer

from lightning_rl.callbacks import FreezeLongLivedObjects


@pytest.fixture(autouse=True)
def nothing_frozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freeze_once_then_unfreeze():
    held = [[i] for i in range(1000)]  # long-lived objects the collector tracks
    cb = FreezeLongLivedObjects()
    cb.freeze()
    count = gc.get_freeze_count()
    assert count >= len(held)
    cb.freeze()  # once
    assert gc.get_freeze_count() == count
    cb.unfreeze()
    assert gc.get_freeze_count() == 0
    cb.unfreeze()  # no-op
    assert gc.get_freeze_count() == 0


class _Watch(L.Callback):
    def __init__(self, fail_at=None):
        self.seen, self.fail_at = [], fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(gc.get_freeze_count())
        if trainer.global_step == self.fail_at:
            raise RuntimeError("a failing step")


def _rows():
    return [{"prompt": f"say {i}"} for i in range(6)]


def test_an_rl_fit_freezes_after_its_first_step_and_unfreezes_at_the_end(make_grpo, make_data):
    watch = _Watch()
    trainer = make_trainer(max_steps=3, callbacks=[watch])
    trainer.fit(make_grpo(), make_data(batch_size=2, rows=_rows()))
    assert trainer.global_step == 3
    assert sum(isinstance(cb, FreezeLongLivedObjects) for cb in trainer.callbacks) == 1  # added by the module
    assert watch.seen[0] == 0 and all(c > 0 for c in watch.seen[1:])  # frozen after the first step
    assert gc.get_freeze_count() == 0  # given back at teardown


def test_a_failed_fit_unfreezes(make_grpo, make_data):
    watch = _Watch(fail_at=2)
    trainer = make_trainer(max_steps=4, callbacks=[watch])
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.fit(make_grpo(), make_data(batch_size=2, rows=_rows()))
    assert watch.seen[-1] > 0  # it was frozen when the step failed
    assert gc.get_freeze_count() == 0
