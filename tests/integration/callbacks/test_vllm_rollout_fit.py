"""VLLMRollout through Trainer.fit with a fake engine on CPU: call order, syncs, teardown, importance weights."""

import lightning as L
import pytest
import torch
from helpers import SUM_ROWS, fake_rollout, rollout_grpo

from lightning_rl import PromptDataModule, VLLMRollout
from lightning_rl.rollout import vllm_internals


def _fit(callback, module, steps=3):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, datamodule=PromptDataModule(train_data=SUM_ROWS, batch_size=2))
    return trainer


def test_order_and_one_sync_after_each_optimizer_step():
    torch.manual_seed(0)
    calls = []
    cb = fake_rollout(calls)
    trainer = _fit(cb, rollout_grpo())
    assert trainer.global_step == 3
    # created once with the policy's weights; step 0 needs no sync, every later batch follows one optimizer step
    assert calls == ["create", "wake", "generate", "sleep"] + ["wake", "sync", "generate", "sleep"] * 2 + ["shutdown"]
    assert cb.num_syncs == 2 and cb.last_synced_step == 2 and cb.engine is None


def test_sync_per_optimizer_step_with_mini_batches():
    calls = []
    cb = fake_rollout(calls)
    trainer = _fit(cb, rollout_grpo(num_mini_batches=2), steps=4)  # 2 optimizer steps per batch
    assert trainer.global_step == 4
    assert calls.count("generate") == 2 and calls.count("sync") == 1
    assert cb.last_synced_step == 2


def test_engine_that_dropped_its_weights_is_synced():
    calls = []
    _fit(fake_rollout(calls, needs_sync_after_sleep=True), rollout_grpo(), steps=2)
    assert calls == ["create", "wake", "generate", "sleep", "wake", "sync", "generate", "sleep", "shutdown"]


def test_rollout_is_attached_to_the_batch_and_used():
    calls = []
    module = rollout_grpo()
    seen = []
    original = module.training_step

    def spy(batch, batch_idx):
        seen.append(batch.get("rollout"))
        return original(batch, batch_idx)

    module.training_step = spy
    _fit(fake_rollout(calls), module, steps=1)
    assert seen and seen[0] is not None and seen[0].num_sequences == 4


def test_teardown_on_exception():
    calls = []
    cb = fake_rollout(calls)

    def failing_reward(prompts, completions, **_):
        if failing_reward.n == 1:
            raise RuntimeError("reward server down")
        failing_reward.n += 1
        return [0.0] * len(completions)

    failing_reward.n = 0
    with pytest.raises(RuntimeError, match="reward server down"):
        _fit(cb, rollout_grpo(reward_funcs=[failing_reward]), steps=3)
    assert calls[-1] == "shutdown" and calls.count("shutdown") == 1
    assert cb.engine is None


def test_grpo_importance_sampling_trains_and_logs_mismatch():
    calls = []
    module = rollout_grpo(importance_sampling="token", importance_sampling_cap=2.0)
    trainer = _fit(fake_rollout(calls), module, steps=2)
    logged = trainer.callback_metrics
    assert "train/logprob_mismatch_mean" in logged and "train/importance_weight" in logged
    # the fake engine samples from the live policy: no mismatch, weights 1
    assert float(logged["train/logprob_mismatch_mean"]) < 1e-4
    assert float(logged["train/importance_weight"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="importance_sampling"):
        rollout_grpo(importance_sampling="tokens")


def test_callback_without_vllm_fails_at_fit_start_with_the_extra(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="lightning-rl"):
        _fit(VLLMRollout(), rollout_grpo(), steps=1)


def test_a_module_that_samples_nothing_in_training_is_refused():
    from lightning_rl import DPO, PreferenceDataModule

    calls = []
    module = DPO(model="tiny-llama", chat_template=False)  # offline: trains on the data's pairs
    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(4)]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[fake_rollout(calls)])
    with pytest.raises(ValueError, match=r"this DPO samples none.*remove the callback \(or train online\)"):
        trainer.fit(module, datamodule=PreferenceDataModule(rows, batch_size=2))
    assert "generate" not in calls
