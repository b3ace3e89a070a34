"""What used to pass without a word during training now warns or stops, naming the cause (tiny models, CPU)."""

import logging
import math

import pytest
import torch
from helpers import MetricRecorder, make_trainer, returns_string
from lightning.pytorch.loggers import Logger

from lightning_rl import DPO, PreferenceDataModule, PromptDataModule, SamplingConfig
from lightning_rl.modules import grpo as grpo_module
from lightning_rl.rewards import RewardError

HEALTH_LOG = "lightning_rl.modules.health"


def scores_nothing(prompts, completions, **columns):
    return [None] * len(completions)


def nan_for_all(prompts, completions, **columns):
    return [math.nan] * len(completions)


def constant(prompts, completions, **columns):
    return [1.0] * len(completions)


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records if r.name == HEALTH_LOG and text in r.getMessage()]


def test_a_reward_that_scores_nothing_warns_every_step_then_stops(make_grpo, make_data, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOG)
    module = make_grpo(reward_funcs=[scores_nothing, nan_for_all], num_generations=2,
                       sampling=SamplingConfig(max_new_tokens=4), max_unscored_steps=3)
    trainer = make_trainer(max_steps=10)
    with pytest.raises(RewardError, match=r"no completion got a reward for 3 steps in a row \(4 completions at step "
                                          r"3; .*\['scores_nothing', 'nan_for_all'\]\).*raise max_unscored_steps"):
        trainer.fit(module, make_data(batch_size=2))
    for name in ("scores_nothing", "nan_for_all"):
        found = warnings_of(caplog, f"{name!r} returned None/NaN for all 4 completions")
        assert [m.split("at step ")[1].split(":")[0] for m in found] == ["1", "2", "3"], found


def test_one_silent_function_warns_and_flat_groups_are_logged(make_grpo, make_data, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOG)
    module = make_grpo(reward_funcs=[scores_nothing, constant], num_generations=2,
                       sampling=SamplingConfig(max_new_tokens=4), max_unscored_steps=1)
    recorder = MetricRecorder(names=("train/frac_reward_zero_std_step", "train/reward_step"))
    make_trainer(max_steps=2, callbacks=[recorder]).fit(module, make_data(batch_size=2))  # `constant` scores: no stop
    assert len(warnings_of(caplog, "'scores_nothing' returned None/NaN for all 4 completions")) == 2
    assert not warnings_of(caplog, "'constant'") and not warnings_of(caplog, "collapsed")
    assert recorder.values["train/frac_reward_zero_std_step"] == [1.0, 1.0]  # every group has equal rewards


def test_a_reward_returning_a_string_is_refused_in_training(make_grpo, make_data):
    module = make_grpo(reward_funcs=[returns_string], num_generations=2)
    with pytest.raises(RewardError, match=r"'returns_string' returned str '1111' for 4 completions; it must return"):
        make_trainer(max_steps=1).fit(module, make_data(batch_size=2))


def test_a_collapsed_policy_is_reported(make_grpo, make_data, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOG)
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=1))
    module.configure_model()
    with torch.no_grad():
        module.policy.model.norm.weight.mul_(1e4)  # near one-hot next-token distributions: entropy ~ 0
    make_trainer(max_steps=1).fit(module, make_data(batch_size=2))
    found = warnings_of(caplog, "the policy looks collapsed: entropy")
    assert len(found) == 1 and "lower learning_rate" in found[0], found


class CaptureLogger(Logger):
    """Keeps what the trainer sends to its logger, step by step."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "capture", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


def test_a_skipped_step_logs_nan_grad_norm_not_the_last_value(make_grpo, make_data, monkeypatch):
    real, calls = grpo_module.clipped_surrogate, []

    def nan_on_second_step(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            terms.loss = terms.loss * math.nan
        return terms

    monkeypatch.setattr(grpo_module, "clipped_surrogate", nan_on_second_step)
    logger = CaptureLogger()
    trainer = make_trainer(max_steps=-1, max_epochs=1, limit_train_batches=3, logger=logger)
    trainer.fit(make_grpo(num_generations=2), make_data(batch_size=2))
    steps = [r for r in logger.rows if "train/grad_norm_step" in r]
    norms = [r["train/grad_norm_step"] for r in steps]
    assert len(norms) == 3 and math.isfinite(norms[0]) and math.isnan(norms[1]) and math.isfinite(norms[2]), norms
    assert [r["train/skipped_steps_step"] for r in steps] == [0.0, 1.0, 0.0]
    losses = [r["train/loss_step"] for r in steps]  # not the first step's loss again
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2]), losses
    epoch = [r for r in logger.rows if "train/skipped_steps_epoch" in r][-1]
    assert epoch["train/skipped_steps_epoch"] == 1.0 and math.isfinite(epoch["train/grad_norm_epoch"])
    assert math.isfinite(epoch["train/loss_epoch"])


def test_a_step_without_rewards_logs_nan_rewards_not_the_last_values(make_grpo, make_data):
    calls = []

    def first_step_only(prompts, completions, **columns):
        calls.append(1)
        if len(calls) > 1:
            return [None] * len(completions)
        return [float(i % 2) for i in range(len(completions))]

    module = make_grpo(reward_funcs=[first_step_only], num_generations=2, max_unscored_steps=0)
    recorder = MetricRecorder(names=("train/reward_step", "train/reward/first_step_only_step"))
    make_trainer(max_steps=3, callbacks=[recorder]).fit(module, make_data(batch_size=2))
    for name, values in recorder.values.items():
        assert values[0] == 0.5 and math.isnan(values[1]) and math.isnan(values[2]), (name, values)


PAIRS = [{"prompt": "ab", "chosen": "ab", "rejected": "ba"}, {"prompt": "cd", "chosen": "cd", "rejected": "dc"}]


@pytest.mark.parametrize("data", ["unpaired", "prompts"])
def test_dpo_names_the_missing_chosen_and_rejected_columns(data):
    dm = PreferenceDataModule(PAIRS, mode="unpaired", batch_size=2) if data == "unpaired" else \
        PromptDataModule(train_data=[{"prompt": "ab"}, {"prompt": "cd"}], batch_size=2)
    with pytest.raises(KeyError, match=r"DPO needs paired rows with a 'chosen' column and a 'rejected' column \(got "
                                       r"columns .*PreferenceDataModule\(mode='paired'\)"):
        make_trainer(max_steps=1).fit(DPO(model="tiny-llama"), dm)
