"""MemoryAwarePrecision(optimizer_states="cpu") through Trainer.fit on CPU: the plan, GRPO, a checkpoint round trip."""

import lightning as L
import pytest
import torch
from helpers import SAY_ROWS, TINY, bit_equal, plugin_trainer, tiny_grpo
from torch import nn

from lightning_rl import MemoryAwarePrecision, PromptDataModule
from lightning_rl.plugins.memory_plan import GiB


def id_sums(prompts, completions, completion_ids, **columns):
    return [sum(i) / 100 for i in completion_ids]


def _grpo(**kw):
    return tiny_grpo(**{"reward_funcs": [id_sums], "model_config": TINY, "micro_batch_size": 2, **kw})


def test_plugin_plan_counts_a_chunk_and_the_autocast_casts():
    def plan(**kw):
        module = _grpo()
        plugin = MemoryAwarePrecision(memory_budget=4 * GiB, **kw)
        plugin_trainer(plugin, steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        return plugin.memory_plan, module

    on_device, module = plan()
    streamed, _ = plan(optimizer_states="cpu", step_chunk_bytes=16 * 1024, split_large_parameters=False)
    sliced, _ = plan(optimizer_states="cpu", step_chunk_bytes=16 * 1024)  # the default: large ones in slices
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert on_device.train_parts["optimizer states"] == 8 * trainable
    assert on_device.train_parts["autocast weight casts"] == 2 * trainable
    largest = max(p.numel() for p in module.parameters() if p.requires_grad) * 8
    assert 16 * 1024 < largest < 8 * trainable  # the largest parameter's states are more than one chunk
    key = "optimizer states (streamed from CPU, one chunk)"
    assert streamed.train_parts[key] == largest  # stepped whole
    assert sliced.train_parts[key] == 16 * 1024  # stepped a chunk of rows at a time
    assert streamed.micro_batch_tokens >= on_device.micro_batch_tokens


@pytest.mark.parametrize("split", [False, True], ids=["whole-parameters", "large-ones-in-slices"])
def test_grpo_fit_with_streamed_states_matches_states_on_device(split):
    results = {}
    chunk = 16 * 1024 if split else 256 * 1024  # 16 KB: the embedding's states are several chunks
    for mode in ("device", "cpu"):
        module = _grpo(beta=0.05)  # several micro-batches per step, gradient clipping, a frozen reference
        plugin = MemoryAwarePrecision(optimizer_states=mode, step_chunk_bytes=chunk, split_large_parameters=split)
        trainer = plugin_trainer(plugin, steps=2)
        trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        assert trainer.global_step == 2
        results[mode] = (module, trainer.optimizers[0], plugin)
    (dev, opt_dev, _), (cpu, opt_cpu, plugin) = results["device"], results["cpu"]
    assert plugin._streamer.last_chunks > 1
    if split:  # the largest parameter's states went through in slices of at most one chunk
        largest = max(p.numel() for p in cpu.parameters() if p.requires_grad) * 8
        assert largest > chunk and 0 < plugin._streamer.last_peak_chunk_bytes <= chunk
    for (n, a), b in zip(dev.policy.named_parameters(), cpu.policy.parameters(), strict=True):
        assert bit_equal(a, b), n
    assert all(p.grad is None for p in cpu.policy.parameters())
    sd_dev, sd_cpu = opt_dev.state_dict(), opt_cpu.state_dict()
    assert sd_dev["state"].keys() == sd_cpu["state"].keys()
    for k, s in sd_dev["state"].items():
        assert all(bit_equal(s[key], sd_cpu["state"][k][key]) for key in s)


class Regression(L.LightningModule):
    """Manual optimization as in the RL modules: two micro-batch backwards, clipping, step, zero_grad, scheduler."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for half in (slice(0, 2), slice(2, 4)):
            loss = (self.net(self.frozen(x[half])).float() - y[half]).pow(2).mean()
            self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        return torch.utils.data.DataLoader([(x, y)] * 8, batch_size=None)  # the same batch every step


def test_checkpoint_round_trip_continues_like_an_uninterrupted_run(tmp_path):
    def plugin():
        return MemoryAwarePrecision(optimizer_states="cpu", step_chunk_bytes=512)

    whole = Regression()
    plugin_trainer(plugin(), steps=4).fit(whole)
    first = Regression()
    trainer = plugin_trainer(plugin(), steps=2)
    trainer.fit(first)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert len(saved["state"]) == 4 and all(s["exp_avg"].device.type == "cpu" for s in saved["state"].values())
    resumed = Regression()
    fresh = plugin()
    loads = []  # the optimizer's load goes through the plugin, which keeps the streamed states in host memory
    load = fresh.load_streamed_optimizer_state
    fresh.load_streamed_optimizer_state = lambda opt, state: (loads.append(opt), load(opt, state))[-1]
    trainer = plugin_trainer(fresh, steps=4)
    trainer.fit(resumed, ckpt_path=path)
    assert trainer.global_step == 4
    assert loads == trainer.optimizers
    assert "load_optimizer_state_dict" not in vars(trainer.strategy)  # the strategy's own again after the fit
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert bit_equal(a, b)
    assert fresh._streamer.states_on_device_bytes(trainer.optimizers) == 0
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [1e-2 / 16]  # schedulers untouched
    device_mode = Regression()
    plugin_trainer(MemoryAwarePrecision(), steps=4).fit(device_mode)
    for a, b in zip(whole.parameters(), device_mode.parameters(), strict=True):
        assert bit_equal(a, b)
