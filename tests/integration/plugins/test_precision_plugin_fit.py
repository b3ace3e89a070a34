"""MemoryAwarePrecision through Trainer.fit on CPU: plans that lower micro-batches and refuse, offloading around a
(fake) engine, GRPO with LoRA over a bf16 base, PPO, DPO, ORPO and KTO."""

import math
import random

import lightning as L
import pytest
import torch
from helpers import SAY_ROWS, TINY, high_ids, plugin_trainer, tiny_grpo

from lightning_rl import DPO, KTO, ORPO, PPO, MemoryAwarePrecision, PreferenceDataModule, PromptDataModule, VLLMRollout
from lightning_rl.plugins import MemoryPlanError
from lightning_rl.plugins.memory_plan import GiB, MiB, kv_bytes_per_token
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.rollout import EngineSettings, HFEngine


def _grpo(**kw):
    return tiny_grpo(**{"model_config": TINY, "micro_batch_size": 4, **kw})


def test_plan_lowers_micro_batch_and_checkpoint_restores_it(tmp_path):
    module = _grpo(micro_batch_size=4)
    plugin = MemoryAwarePrecision(memory_budget=2 * GiB, activation_bytes_per_token=4 * 10**7)
    trainer = plugin_trainer(plugin, steps=1)
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    # ~1.75 GiB left after weights, Adam, a log-prob chunk and the reserve; 20 tokens x 40 MB = 0.75 GiB a sequence
    assert plugin.memory_plan is not None and plugin.memory_plan.micro_batch_tokens == 40
    assert module.micro_batch_size == plugin.planned_micro_batch_size == 2
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["MemoryAwarePrecision"]["micro_batch_size"] == 2
    assert saved["MemoryAwarePrecision"]["plan"]["micro_batch_tokens"] == 40
    resumed = _grpo(micro_batch_size=4)
    fresh = MemoryAwarePrecision()  # no budget on a CPU: no plan of its own, takes the saved one
    plugin_trainer(fresh, steps=2).fit(resumed, PromptDataModule(train_data=SAY_ROWS, batch_size=2), ckpt_path=path)
    assert resumed.micro_batch_size == 2 and fresh.memory_plan == plugin.memory_plan


def test_a_planned_token_budget_is_restored_with_the_plan(tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.micro_batch_tokens)

    module = _grpo(micro_batch_size=None)  # the default: micro-batches of the plan's token budget
    plugin = MemoryAwarePrecision(memory_budget=2 * GiB, activation_bytes_per_token=4 * 10**7)
    trainer = plugin_trainer(plugin, steps=1, callbacks=[Spy()])
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    resumed = _grpo(micro_batch_size=None)
    plugin_trainer(MemoryAwarePrecision(), steps=2, callbacks=[Spy()]).fit(
        resumed, PromptDataModule(train_data=SAY_ROWS, batch_size=2), ckpt_path=path)
    assert seen == [40, 40]  # the resumed step micro-batches as the saving run did


def test_grpo_fit_with_the_plugin_trains_fp32_lora_over_a_bf16_base():
    module = _grpo(lora={"r": 4, "lora_alpha": 8}, beta=0.05)
    plugin = MemoryAwarePrecision()
    trainer = plugin_trainer(plugin, steps=2)
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert trainer.global_step == 2
    lora = [p for n, p in module.policy.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)  # B moved from 0
    frozen = [p for p in module.policy.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert plugin.cache_clears > 0  # the reference log-probs ran under no_grad
    assert plugin.memory_plan is None  # a CPU with no budget: nothing to plan against


def test_fit_refuses_before_training_when_the_budget_is_too_small():
    module = _grpo()
    with pytest.raises(MemoryPlanError, match="optimizer states"):
        plugin_trainer(MemoryAwarePrecision(memory_budget=10**6), steps=1).fit(
            module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert module.trainer.global_step == 0


class FakeEngine:
    def __init__(self, module, calls, plugin):
        self.inner = HFEngine(lambda: module.policy, module.tokenizer.pad_token_id, module.eos_token_ids)
        self.calls, self.plugin, self.needs_sync = calls, plugin, False

    def wake_up(self):
        self.calls.append(("wake", self.plugin._offloader.is_offloaded))

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, sampling, num_generations):
        return self.inner.generate(prompt_ids, sampling, num_generations)

    def sleep(self):
        self.calls.append(("sleep", self.plugin._offloader.is_offloaded))


@pytest.mark.parametrize("states", ["device", "cpu"])
def test_rollout_callback_offloads_while_the_engine_is_awake_and_gets_a_kv_budget(states):
    module = _grpo()
    plugin = MemoryAwarePrecision(offload_optimizer=True, memory_budget=4 * GiB, engine_overhead_bytes=0,
                                  optimizer_states=states, step_chunk_bytes=4096)
    calls = []
    cb = VLLMRollout(engine_factory=lambda m, n, seed: FakeEngine(m, calls, plugin))
    snapshots = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            snapshots.append(sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))

    trainer = plugin_trainer(plugin, steps=3, callbacks=[cb, Check()])
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert trainer.global_step == 3
    # optimizer states are away while the engine is awake (before the first step there is nothing to move)
    assert calls == [("wake", False), ("sleep", False)] + [("wake", True), ("sleep", True)] * 2
    assert not plugin._offloader.is_offloaded and snapshots[-1] > 0
    assert plugin.kv_cache_bytes is not None and plugin.memory_plan.rollout_parts["optimizer states"] == 0
    assert plugin.kv_cache_bytes >= 2 * 2 * 20 * kv_bytes_per_token(module.policy.config, 2)


@pytest.mark.parametrize(("keep", "kept"), [(None, True), (0, False)])
def test_plan_counts_engine_weights_that_stay_while_the_engine_sleeps(keep, kept):
    """A small full fine-tune: the engine sleeps at level 0, so its weights are there during training too."""
    module = _grpo()
    plugin = MemoryAwarePrecision(memory_budget=4 * GiB, engine_overhead_bytes=0)
    calls = []
    settings = EngineSettings() if keep is None else EngineSettings(keep_weights_bytes=keep)
    cb = VLLMRollout(engine_factory=lambda m, n, seed: FakeEngine(m, calls, plugin), settings=settings)
    trainer = plugin_trainer(plugin, steps=1, callbacks=[cb])
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    parts = plugin.memory_plan.train_parts
    name = "engine weights (kept while the engine sleeps)"
    if kept:
        params = sum(p.numel() for p in module.policy.parameters())
        assert next(module.policy.parameters()).dtype == torch.float32  # the plugin trains them in fp32,
        assert parts[name] == params * 2  # but computes in bf16, so an engine with dtype="auto" holds bf16 weights
    else:
        assert name not in parts


def test_ppo_and_dpo_fit_with_the_plugin():
    L.seed_everything(0, verbose=False)
    ppo = PPO(reward_funcs=[high_ids], model="tiny-llama", model_config=TINY, num_generations=2,
              sampling={"max_new_tokens": 4}, learning_rate=3e-3, num_iterations=1, num_mini_batches=1,
              micro_batch_size=4, chat_template=False, max_prompt_length=16)
    trainer = plugin_trainer(MemoryAwarePrecision(), steps=1)
    trainer.fit(ppo, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert trainer.global_step >= 1
    rng = random.Random(0)
    pairs = []
    for _ in range(8):
        s = "".join(rng.choice("abcdef") for _ in range(4))
        pairs.append({"prompt": s, "chosen": "".join(sorted(s)), "rejected": "".join(sorted(s, reverse=True))})
    dpo = DPO(beta=0.1, model="tiny-llama", model_config=TINY, learning_rate=1e-3, lora={"r": 4, "lora_alpha": 8})
    trainer = plugin_trainer(MemoryAwarePrecision(), steps=2)
    trainer.fit(dpo, PreferenceDataModule(pairs, batch_size=4))
    assert trainer.global_step == 2
    assert all(p.dtype == torch.bfloat16 for p in dpo.policy.parameters() if not p.requires_grad)


def test_orpo_and_kto_fit_with_the_plugin():
    L.seed_everything(0, verbose=False)
    rng = random.Random(1)
    pairs = []
    for _ in range(8):
        s = "".join(rng.choice("abcdef") for _ in range(4))
        pairs.append({"prompt": s, "chosen": "".join(sorted(s)), "rejected": "".join(sorted(s, reverse=True))})
    orpo = ORPO(model="tiny-llama", model_config=TINY, learning_rate=1e-3, lora={"r": 4, "lora_alpha": 8})
    trainer = plugin_trainer(MemoryAwarePrecision(), steps=2)
    trainer.fit(orpo, PreferenceDataModule(pairs, batch_size=4))
    assert trainer.global_step == 2
    assert all(p.dtype == torch.bfloat16 for p in orpo.policy.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in orpo.policy.parameters() if p.requires_grad)
    kto = KTO(model="tiny-llama", model_config=TINY, learning_rate=1e-3, lora={"r": 4, "lora_alpha": 8})
    trainer = plugin_trainer(MemoryAwarePrecision(), steps=2)
    trainer.fit(kto, PreferenceDataModule(pairs, batch_size=4, mode="unpaired"))
    assert trainer.global_step == 2
    assert all(p.dtype == torch.bfloat16 for p in kto.policy.parameters() if not p.requires_grad)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


class Provider:
    """A rollout engine's owner, as the plugin sees it: only what it registered."""

    def __init__(self, memory):
        self.memory, self.shapes = memory, []

    def rollout_memory(self, shape):
        self.shapes.append(shape)
        return self.memory


def test_plan_takes_the_engines_needs_from_the_registered_provider():
    module = _grpo()
    plugin = MemoryAwarePrecision(memory_budget=4 * GiB, engine_overhead_bytes=0)
    provider = Provider(RolloutMemory(engine_weight_bytes=10 * MiB, weights_kept_asleep_bytes=3 * MiB,
                                      kv_bytes_per_token=1000, kv_tokens=500, headroom=1.5))
    plugin.register_rollout(provider)
    plugin_trainer(plugin, steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    shape = provider.shapes[0]
    assert (shape.num_generations, shape.sequence_tokens, shape.generates) == (2, 20, True)
    plan = plugin.memory_plan
    assert plan.rollout_parts["engine weights"] == 10 * MiB
    assert plan.kv_cache_bytes == math.ceil(500 * 1000 * 1.5)
    assert plan.train_parts["engine weights (kept while the engine sleeps)"] == 3 * MiB
