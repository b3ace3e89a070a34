"""Epoch-end metrics in a one-process group (what vLLM starts on one GPU) make no collective call."""

import torch.distributed as dist
from helpers import make_trainer

from lightning_rl.modules.metrics import several_processes


def test_no_collective_at_epoch_end_in_a_one_process_group(one_process_group, make_grpo, make_data, monkeypatch):
    calls = []
    for name in ("barrier", "all_gather", "all_reduce", "all_gather_object"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _n=name, _real=real, **k: (calls.append(_n), _real(*a, **k))[1])
    module, data = make_grpo(), make_data(batch_size=2, rows=[{"prompt": f"say {i}"} for i in range(4)])
    trainer = make_trainer(max_steps=4, max_epochs=2)
    trainer.fit(module, data)
    assert trainer.current_epoch == 2 and trainer.global_step == 4  # two epoch ends
    assert "train/reward_epoch" in trainer.callback_metrics  # the epoch means were computed
    assert not several_processes()
    assert calls == []


def test_several_processes_is_false_without_a_group():
    assert not dist.is_initialized()
    assert not several_processes()
