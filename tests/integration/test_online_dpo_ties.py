"""Online DPO stops with a clear error when every pair ties, instead of never reaching max_steps."""

import logging

import lightning as L
import pytest
import torch
from helpers import make_trainer

from lightning_rl import DPO, PromptDataModule, SamplingConfig
from lightning_rl.modules.health import RunHealth
from lightning_rl.rewards import RewardError


def always_zero(prompts, completions, **columns):
    """A reward that ties every pair (like a 0/1 correctness reward the model never earns)."""
    return [0.0] * len(completions)


class BatchLimit(L.Callback):
    """Fails the test instead of hanging when the run does not stop by itself."""

    def __init__(self, limit: int):
        self.limit, self.batches = limit, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.batches >= self.limit:
            raise AssertionError(f"{self.batches} batches ran with global_step={trainer.global_step}")


def test_all_tie_batches_warn_then_stop_the_run(saved_tiny_llama, caplog):
    L.seed_everything(0)
    module = DPO(model=saved_tiny_llama(1), online=True, reward_funcs=[always_zero],
                 sampling=SamplingConfig(max_new_tokens=2))
    limit = BatchLimit(20)
    t = make_trainer(max_steps=3, callbacks=[limit])
    with caplog.at_level(logging.WARNING), pytest.raises(RewardError, match=(
            r"for 3 batches in a row, reward functions \['always_zero'\] gave both completions of every prompt the "
            r"same reward.*global_step stayed at 0.*denser reward.*temperature.*max_unscored_steps")):
        t.fit(module, PromptDataModule([{"prompt": f"say {i}"} for i in range(20)], batch_size=2))
    assert limit.batches == 2 and t.global_step == 0  # the third batch raised
    assert caplog.text.count("no pair to train on") == 3


def test_tie_streak_resets_on_a_batch_with_a_pair_and_is_saved():
    health = RunHealth(max_unscored_steps=2)
    health.check_pairs(0, 4, ["r"], 0)
    health.check_pairs(1, 4, ["r"], 0)  # one pair had a winner: the streak starts again
    health.check_pairs(0, 4, ["r"], 1)
    assert health.state_dict() == {"unscored_streak": 0, "tie_streak": 1, "flat_streak": 0, "masked_streak": 0}
    resumed = RunHealth(max_unscored_steps=2)
    resumed.load_state_dict(health.state_dict())
    with pytest.raises(RewardError, match="2 batches in a row"):
        resumed.check_pairs(0, 4, ["r"], 1)
    never = RunHealth(max_unscored_steps=0)  # 0 never stops (each batch still warns)
    for step in range(5):
        never.check_pairs(0, 4, ["r"], step)
    assert never.tie_streak == 5


def test_nan_rewards_stop_as_unscored_steps_first():
    health = RunHealth(max_unscored_steps=1)
    total = torch.full((4,), float("nan"))
    with pytest.raises(RewardError, match="no completion got a reward"):
        health.check_rewards(total, total.view(4, 1), ["r"], 0)


def test_online_dpo_over_several_processes_is_refused_at_setup(monkeypatch):
    from types import SimpleNamespace

    from lightning_rl.modules.policy import PolicyModule

    module = DPO(model="tiny-llama", online=True, reward_funcs=[always_zero], chat_template=False)
    monkeypatch.setattr(PolicyModule, "setup", lambda self, stage: None)  # the strategy checks need a real trainer
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"online DPO runs in one process.*\(2 processes here\)"):
        module.setup("fit")
    module._trainer = SimpleNamespace(world_size=1)
    module.setup("fit")
    offline = DPO(model="tiny-llama", chat_template=False)
    offline._trainer = SimpleNamespace(world_size=2)
    offline.setup("fit")  # offline pairs are the same number on every process
