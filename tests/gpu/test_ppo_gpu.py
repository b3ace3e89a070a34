"""PPO on CUDA for two rollouts: with the colocated vLLM callback, and with the default engine + LoRA."""

import math

import lightning as L
import pytest
import torch

from lightning_rl import PPO, ArithmeticDataModule, SamplingConfig
from lightning_rl.rewards import NumericMatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def length_reward(prompts, completions, **columns):
    """Characters / 100: never the same for every completion, so the returns differ from zero."""
    return [len(c) / 100 for c in completions]


def _fit(module, callbacks=()):
    steps = 2 * module.num_iterations * module.num_mini_batches  # two rollouts
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        limit_val_batches=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("ppo fit:", {k: round(v, 4) for k, v in sorted(metrics.items()) if k.endswith("_step")})
    assert trainer.global_step == steps
    for key in ("reward", "value_loss", "policy_loss", "kl", "entropy", "clip_ratio"):
        assert math.isfinite(metrics[f"train/{key}_step"]), key
    return trainer, metrics


@pytest.mark.vllm
def test_ppo_fit_with_the_vllm_callback():
    pytest.importorskip("vllm")
    from lightning_rl.callbacks import VLLMRollout
    from lightning_rl.rollout import EngineSettings

    torch.manual_seed(0)
    # a dense reward besides the sparse one: two rollouts of SmolLM2 may score 0 everywhere on arithmetic
    # (seen on an H200), and with all-zero returns the value head has nothing to learn
    module = PPO(reward_funcs=[NumericMatch(position="first"), length_reward], model="smollm2-135m-instruct",
                 dtype="bfloat16", num_generations=4, sampling=SamplingConfig(max_new_tokens=32), micro_batch_size=16,
                 max_prompt_length=128, learning_rate=1e-5, num_iterations=1, num_mini_batches=1)
    callback = VLLMRollout(settings=EngineSettings(execution="eager"))
    _fit(module, [callback])
    assert not callback.overlapping  # PPO has no importance weights for a rollout one step old
    assert callback.num_rollouts == 2 and callback.num_syncs == 1
    assert callback.engine is None  # teardown shut it down
    assert module.value_head.summary.weight.abs().sum().item() > 0  # the value head trained (zero at start)


def test_ppo_fit_with_the_default_engine_and_lora():
    torch.manual_seed(0)
    # the dense reward too, as above: it failed on an H100 (2026-12-05), most likely at the value head's check
    # (the run's log was cut off before pytest wrote why)
    module = PPO(reward_funcs=[NumericMatch(position="first"), length_reward], model="smollm2-135m-instruct",
                 dtype="bfloat16", lora={"r": 8}, num_generations=2, sampling=SamplingConfig(max_new_tokens=16),
                 micro_batch_size=8, max_prompt_length=128, learning_rate=1e-4, num_iterations=2, num_mini_batches=2)
    assert module.value_head is None  # built in configure_model, during fit
    _fit(module)
    assert module.value_head.summary.weight.abs().sum().item() > 0  # the value head trained (zero at start)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("value_head.") for n in trainable)
