"""A tiny random model learns a rewarded behaviour under GRPO on a CPU; every option runs."""

import math

import pytest
import torch
from helpers import MetricRecorder, make_trainer, sevens, state_copy

from lightning_rl import SamplingConfig
from lightning_rl.algorithms.losses import LOSS_TYPES


def test_tiny_model_learns_to_write_sevens(make_grpo, make_data):
    # measured (seeds 0, 1, 2; 15 steps): first 5 steps 0.07 / 0.07 / 0.11 mean reward, last 5 steps
    # 0.83 / 0.92 / 0.96. A random 103-token model writes '7' about 1% of the time.
    module = make_grpo(seed=0, reward_funcs=[sevens], num_generations=4, sampling=SamplingConfig(max_new_tokens=6),
                       learning_rate=1e-2, micro_batch_size=16)
    rec = MetricRecorder()
    trainer = make_trainer(max_steps=15, callbacks=[rec])
    trainer.fit(module, make_data(batch_size=4))
    rewards = rec.values["train/reward_step"]
    assert trainer.global_step == 15 and len(rewards) == 15
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.25, rewards
    assert last > 0.5 and last - first > 0.35, rewards
    # the epoch-level metrics and the progress-bar entries are there too
    metrics = trainer.callback_metrics
    for name in ("train/reward_epoch", "train/entropy_step", "train/completion_length_step",
                 "train/clip_ratio_step", "train/grad_norm_step", "train/tokens_per_sec_step",
                 "train/reward/sevens_step", "train/truncated_frac_step"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    assert "train/reward_step" in trainer.progress_bar_metrics


def test_without_learning_the_reward_stays_low(make_grpo, make_data):
    # the control of the test above: same seed and data, a learning rate too small to matter
    # (measured: first 5 steps 0.018, last 5 steps 0.005)
    module = make_grpo(seed=0, reward_funcs=[sevens], num_generations=4, sampling=SamplingConfig(max_new_tokens=6),
                       learning_rate=1e-7, micro_batch_size=16)
    rec = MetricRecorder()
    make_trainer(max_steps=15, callbacks=[rec]).fit(module, make_data(batch_size=4))
    rewards = rec.values["train/reward_step"]
    assert sum(rewards[-5:]) / 5 < 0.1 and sum(rewards[-5:]) - sum(rewards[:5]) < 0.25, rewards


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_runs(make_grpo, make_data, loss_type):
    module = make_grpo(loss_type=loss_type, num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                       micro_batch_size=2)
    module.configure_model()
    before = state_copy(module.policy)
    rec = MetricRecorder()
    trainer = make_trainer(max_steps=3, callbacks=[rec])
    trainer.fit(module, make_data(batch_size=2))
    assert trainer.global_step == 3
    assert all(math.isfinite(v) for v in rec.values["train/loss_step"])
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_num_iterations_and_mini_batches(make_grpo, make_data):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=4), num_iterations=2,
                       num_mini_batches=2, micro_batch_size=1, mask_truncated_completions=True)
    calls = []
    real = module.optimizer_step_checked
    module.optimizer_step_checked = lambda loss: calls.append(loss) or real(loss)
    trainer = make_trainer(max_steps=4)
    trainer.fit(module, make_data(batch_size=2))
    # one batch gives num_iterations * num_mini_batches = 4 optimizer steps
    assert trainer.global_step == 4 and len(calls) == 4
    assert all(math.isfinite(c) for c in calls)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 16}], ids=["frozen-copy", "lora"])
def test_kl_to_the_reference_starts_at_zero(make_grpo, make_data, lora):
    module = make_grpo(beta=0.1, lora=lora, num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                       learning_rate=3e-2 if lora else 1e-2)
    module.configure_model()
    base_before = {k: v for k, v in state_copy(module.policy).items() if "lora_" not in k}
    if lora:
        assert module._frozen_reference == []  # the reference is the adapter-disabled base
    else:
        assert len(module._frozen_reference) == 1
    rec = MetricRecorder()
    make_trainer(max_steps=4, callbacks=[rec]).fit(module, make_data(batch_size=2))
    kl = rec.values["train/kl_step"]
    assert all(math.isfinite(v) and v >= 0 for v in kl), kl
    assert kl[0] < 1e-6, kl  # policy == reference before the first update
    assert max(kl[1:]) > 1e-5, kl
    after = module.policy.state_dict()
    if lora:
        # base weights never move; only adapters train
        assert all(torch.equal(base_before[k], after[k]) for k in base_before)
        assert any("lora_" in k and not torch.equal(v, torch.zeros_like(v)) for k, v in after.items())
    else:
        ref = module._frozen_reference[0].state_dict()
        assert all(torch.equal(ref[k], base_before[k]) for k in ref)  # the copy stays frozen
        assert any(not torch.equal(base_before[k], after[k]) for k in base_before)
        assert not any(p is q for p in module.parameters() for q in module._frozen_reference[0].parameters())
