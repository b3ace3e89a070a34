"""GRPO training through Trainer.fit: uneven mini-batches, reward functions failing inside training, non-finite losses
(skipped, then stopped on)."""

import pytest
import torch
from helpers import make_trainer, sevens, state_copy

from lightning_rl.modules import NonFiniteLossError
from lightning_rl.modules import grpo as grpo_module
from lightning_rl.rewards import RewardError


def test_mini_batches_that_do_not_divide_the_rollout_still_train(make_grpo, make_data):
    """3 prompts x G=2 = 6 completions in 4 mini-batches: 4 optimizer steps on shares of 2, 1, 2, 1."""
    module = make_grpo(num_generations=2, num_mini_batches=4)
    trainer = make_trainer(max_steps=4)
    trainer.fit(module, make_data(batch_size=3))
    assert trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_more_mini_batches_than_a_batch_has_completions_is_refused_before_the_first_rollout(make_grpo, make_data):
    """2 prompts x G=2 = 4 completions cannot make 6 optimizer steps: before, the step made 4 and the run stopped at
    another step than max_steps said. The error comes before any rollout is sampled, and names both fixes."""
    module = make_grpo(num_generations=2, num_mini_batches=6)
    sampled = []
    real = module.generate_rollout
    module.generate_rollout = lambda *a, **k: sampled.append(1) or real(*a, **k)
    with pytest.raises(ValueError, match=r"num_mini_batches=6 is more than the 4 completions .*at most 4.*batch_size"):
        make_trainer(max_steps=6).fit(module, make_data(batch_size=2))
    assert not sampled


def test_a_resume_at_an_epochs_smaller_last_batch_trains_it_in_fewer_mini_batches(make_grpo, tmp_path):
    """6 rows in batches of 4, G=2, 8 mini-batches: the full batch makes 8 optimizer steps, the last (2 prompts) 4.
    A fit resumed after step 8 starts at that smaller batch: the check counts the full batch the data states."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_rl import PromptDataModule

    rows = [{"prompt": f"say {i}"} for i in range(6)]
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    trainer = make_trainer(max_steps=12, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(make_grpo(num_generations=2, num_mini_batches=8), PromptDataModule(rows, batch_size=4, shuffle=False))
    assert trainer.global_step == 12
    resumed = make_trainer(max_steps=12)
    resumed.fit(make_grpo(num_generations=2, num_mini_batches=8), PromptDataModule(rows, batch_size=4, shuffle=False),
                ckpt_path=next(tmp_path.glob("*step=8*.ckpt")))
    assert resumed.global_step == 12


def fails_on_say_1(prompts, completions, **columns):
    """Raises on the completions of the prompt 'say 1'."""
    out = []
    for p in prompts:
        if p == "say 1":
            raise KeyError("no score for say 1")
        out.append(0.0)
    return out


def one_value(prompts, completions, **columns):
    return [1.0]


def test_reward_function_raising_inside_training(make_grpo, make_data):
    module = make_grpo(reward_funcs=[sevens, fails_on_say_1], num_generations=2)
    with pytest.raises(RewardError) as info:
        make_trainer(max_steps=1).fit(module, make_data(batch_size=2, shuffle=False))
    msg = str(info.value)
    # rows are [say 0, say 0, say 1, say 1]: the first failing sample is 2
    assert "'fails_on_say_1'" in msg and "KeyError" in msg and "sample 2" in msg and "'say 1'" in msg


def test_reward_function_wrong_count_inside_training(make_grpo, make_data):
    module = make_grpo(reward_funcs=[one_value], num_generations=2)
    with pytest.raises(RewardError, match=r"'one_value' returned 1 values for 4 completions"):
        make_trainer(max_steps=1).fit(module, make_data(batch_size=2))


@pytest.fixture
def nan_loss(monkeypatch):
    """Make the surrogate loss NaN on the calls whose number is in ``calls`` (all when None)."""
    real = grpo_module.clipped_surrogate
    state = {"calls": None, "n": 0}

    def patched(*args, **kwargs):
        terms = real(*args, **kwargs)
        state["n"] += 1
        if state["calls"] is None or state["n"] in state["calls"]:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(grpo_module, "clipped_surrogate", patched)
    return state


def test_nan_loss_skips_the_step_and_keeps_weights(make_grpo, make_data, nan_loss):
    module = make_grpo(num_generations=2, max_nonfinite_steps=3)
    module.configure_model()
    before = state_copy(module.policy)
    trainer = make_trainer(max_steps=-1, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, make_data(batch_size=2))
    assert nan_loss["n"] == 2
    assert trainer.global_step == 0  # no optimizer step happened
    assert not trainer.optimizers[0].state  # AdamW never stepped
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_streak_resets_after_a_finite_step(make_grpo, make_data, nan_loss):
    nan_loss["calls"] = {1, 3}  # NaN, finite, NaN, finite: never 2 in a row
    module = make_grpo(num_generations=2, max_nonfinite_steps=2)
    module.configure_model()
    before = state_copy(module.policy)
    trainer = make_trainer(max_steps=-1, max_epochs=1, limit_train_batches=4)
    trainer.fit(module, make_data(batch_size=2))
    assert trainer.global_step == 2
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_nan_loss_stops_after_max_nonfinite_steps(make_grpo, make_data, nan_loss):
    module = make_grpo(num_generations=2, max_nonfinite_steps=3)
    module.configure_model()
    before = state_copy(module.policy)
    trainer = make_trainer(max_steps=-1, max_epochs=1, limit_train_batches=6)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf for 3 optimizer steps in a row.*Lower the learning rate"):
        trainer.fit(module, make_data(batch_size=2))
    assert nan_loss["n"] == 3
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_prompt_too_long_in_the_data_is_refused_at_fit_start_by_its_row(make_grpo, make_data):
    """Row 5 of the training data and row 1 of the validation data are too long: the fit stops before its first
    rollout, naming the split and row (not a place in a batch that comes up hours in). With truncate_prompts the
    same data trains."""
    from lightning_rl import PromptDataModule
    from lightning_rl.prompting import PromptTooLongError

    rows = [{"prompt": f"say {i}"} for i in range(8)]
    rows[5] = {"prompt": "find me " + "x" * 200}
    module = make_grpo(num_generations=2, max_prompt_length=32)
    sampled = []
    real = module.generate_rollout
    module.generate_rollout = lambda *a, **k: sampled.append(1) or real(*a, **k)
    with pytest.raises(PromptTooLongError, match=r"^train row 5 has \d+ tokens, more than max_prompt_length=32 \(the "
                                                 r"prompt starts 'find me x+\.\.\.'\); raise max_prompt_length"):
        make_trainer(max_steps=1).fit(module, make_data(batch_size=2, rows=rows, shuffle=False))
    assert not sampled
    val = [{"prompt": "ok"}, {"prompt": "y" * 200}]
    data = PromptDataModule(train_data=rows[:4], val_data=val, batch_size=2)
    with pytest.raises(PromptTooLongError, match=r"^validation row 1 has"):
        make_trainer(max_steps=1).fit(make_grpo(num_generations=2, max_prompt_length=32), datamodule=data)
    module = make_grpo(num_generations=2, max_prompt_length=32, truncate_prompts=True)
    make_trainer(max_steps=1).fit(module, make_data(batch_size=2, rows=rows, shuffle=False))


def test_a_prompt_whose_completion_would_pass_the_models_positions_is_refused(make_grpo, make_data, tmp_path):
    from lightning_rl import SamplingConfig, load_policy
    from lightning_rl.prompting import PromptTooLongError

    torch.manual_seed(0)
    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1, "max_position_embeddings": 32})
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"prompt": "x" * 10}, {"prompt": "y" * 30}]
    module = make_grpo(model=str(tmp_path / "m"), model_config=None, num_generations=2, chat_template=False,
                       max_prompt_length=None, sampling=SamplingConfig(max_new_tokens=8))
    with pytest.raises(PromptTooLongError, match=r"train row 1 has 30 tokens; with max_new_tokens=8 its "
                                                 r"sequence can reach \d+ tokens, more than the model's 32 positions "
                                                 r"\(config.max_position_embeddings\)\. Set the module's "
                                                 r"max_prompt_length to at most 24"):
        make_trainer(max_steps=1).fit(module, make_data(batch_size=2, rows=rows))
    # within the limit the same model trains
    module = make_grpo(model=str(tmp_path / "m"), model_config=None, num_generations=2, chat_template=False,
                       max_prompt_length=24, truncate_prompts=True, sampling=SamplingConfig(max_new_tokens=8))
    make_trainer(max_steps=1).fit(module, make_data(batch_size=2, rows=rows))
