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


def test_step_metrics_stay_in_host_memory_when_the_module_moves_in_one_process(make_grpo, monkeypatch):
    """A module moved to another device or dtype keeps its metrics on the CPU in float32, where the logged floats
    are (on a GPU each update was a copy, a NaN check that waits for the device, and small kernels); logging still
    computes the means. Under several processes they move, for torchmetrics' collective sync."""
    import torch

    from lightning_rl.modules import metrics as metrics_mod

    module = make_grpo()
    module.to(torch.float64)
    module.to("meta")  # stands in for a GPU on this CPU: every parameter and buffer moves
    metrics = [*module.train_metrics.values(), *module.val_metrics.values()]
    assert metrics and all(m.device.type == "cpu" for m in metrics)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for m in metrics for t in m.metric_state.values())
    monkeypatch.setattr(module, "log", lambda *a, **k: None)  # no Trainer here
    module.log_values("train", {"reward": 0.25, "loss": float("nan")}, batch_size=2)
    module.log_values("train", {"reward": 0.75, "loss": 1.0}, batch_size=2)
    train = module.train_metrics
    assert train["reward"].compute().item() == 0.5 and train["loss"].compute().item() == 1.0  # the NaN left out

    monkeypatch.setattr(metrics_mod, "several_processes", lambda: True)
    module.to("meta")
    assert all(m.device.type == "meta" for m in module.train_metrics.values())
