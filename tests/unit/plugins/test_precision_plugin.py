"""MemoryAwarePrecision on CPU: dtypes, autocast, the memory plan's arithmetic, offloading, checkpoints, fits."""

import math
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn

from lightning_rl import (
    DPO,
    GRPO,
    KTO,
    ORPO,
    PPO,
    MemoryAwarePrecision,
    PreferenceDataModule,
    PromptDataModule,
    VLLMRollout,
)
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.plugins import (
    MemoryAwareFSDPPrecision,
    MemoryPlan,
    MemoryPlanError,
    ModelMemory,
    OptimizerOffloader,
    RolloutNeeds,
    plan_memory,
)
from lightning_rl.plugins import precision as precision_mod
from lightning_rl.plugins.memory_plan import GiB, MiB, activation_bytes_per_token, kv_bytes_per_token
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.plugins.shape_plan import plan_for_shape
from lightning_rl.rollout import EngineSettings, HFEngine
from lightning_rl.shapes import TrainingShape

TINY = {"num_hidden_layers": 1}
ROWS = [{"prompt": f"say {i}"} for i in range(16)]
QWEN_05B = SimpleNamespace(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936)


def dense_reward(prompts, completions, completion_ids, **columns):
    return [sum(ids) / (100 * max(len(ids), 1)) for ids in completion_ids]


def _grpo(**kw):
    L.seed_everything(0, verbose=False)
    args = dict(reward_funcs=[dense_reward], model="tiny-llama", model_config=TINY, num_generations=2,
                sampling={"max_new_tokens": 4}, learning_rate=3e-3, micro_batch_size=4,
                logprob_backend="reference", chat_template=False, max_prompt_length=16)
    args.update(kw)
    return GRPO(**args)


def _trainer(plugin, steps=2, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     plugins=[plugin], callbacks=list(callbacks), **kw)


# ----------------------------------------------------------------------------- dtypes
def test_lora_frozen_base_in_bf16_adapters_in_fp32():
    net, _ = load_policy("tiny-llama", TINY)
    net = apply_lora(net, {"r": 4, "lora_alpha": 8})
    MemoryAwarePrecision().convert_module(net)
    for name, p in net.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert any(p.requires_grad for p in net.parameters())
    assert all(b.dtype == torch.float32 for n, b in net.named_buffers() if "inv_freq" in n)  # buffers untouched


def test_trainable_weights_become_fp32_masters_and_float32_keeps_frozen():
    net, _ = load_policy("tiny-llama", TINY, dtype="bfloat16")
    net.model.embed_tokens.weight.requires_grad_(False)  # tied with the head: frozen, as one parameter
    MemoryAwarePrecision(frozen_dtype="float32").convert_module(net)
    assert net.model.embed_tokens.weight.dtype == torch.float32
    assert net.lm_head.weight is net.model.embed_tokens.weight
    assert net.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    net2, _ = load_policy("tiny-llama", TINY)
    net2.model.layers[0].requires_grad_(False)
    MemoryAwarePrecision().convert_module(net2)
    assert net2.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert net2.model.norm.weight.dtype == torch.float32


def test_frozen_reference_copy_is_converted():
    module = _grpo(beta=0.1)
    module.configure_model()
    MemoryAwarePrecision().convert_module(module)
    ref = module._frozen_reference[0]
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------- autocast
def test_autocast_and_cache_cleared_when_grad_mode_changes():
    plugin = MemoryAwarePrecision()
    lin = nn.Linear(8, 8)
    plugin.convert_module(lin)
    x = torch.randn(4, 8)
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with torch.no_grad():
            old = lin(x)
        assert plugin.cache_clears == 0
        y = lin(x)  # no_grad -> grad: the cache is cleared first
        assert plugin.cache_clears == 1
    assert old.dtype == y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    plugin.teardown()
    assert not plugin._hooks


def test_bad_arguments_and_missing_bitsandbytes(monkeypatch):
    with pytest.raises(ValueError, match="compute_dtype"):
        MemoryAwarePrecision(compute_dtype="float32")
    with pytest.raises(ValueError, match="frozen_dtype"):
        MemoryAwarePrecision(frozen_dtype="int8")
    monkeypatch.setattr(precision_mod, "_BNB_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install bitsandbytes"):
        MemoryAwarePrecision(quantize="nf4")


def test_fsdp_variant_is_an_fsdp_precision_and_keeps_dtypes():
    plugin = MemoryAwareFSDPPrecision()
    assert isinstance(plugin, FSDPPrecision) and isinstance(plugin, MemoryAwarePrecision)
    assert plugin.mixed_precision_config.param_dtype == torch.bfloat16
    lin = nn.Linear(4, 4).requires_grad_(False)
    plugin.convert_module(lin)
    assert lin.weight.dtype == torch.float32  # FSDP units need one dtype: storage is FSDP's business
    MemoryAwareFSDPPrecision(convert_frozen=True).convert_module(lin)
    assert lin.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantize"):
        MemoryAwareFSDPPrecision(quantize="nf4")


# ----------------------------------------------------------------------------- plan arithmetic
def test_kv_and_activation_estimates_for_a_qwen_shape():
    assert kv_bytes_per_token(QWEN_05B, 2) == 2 * 24 * 2 * 64 * 2  # 12 KiB per token
    full = activation_bytes_per_token(QWEN_05B, 2)
    assert full == 24 * (10 * 896 + 2 * 128 + 5 * 4864) * 2
    assert activation_bytes_per_token(QWEN_05B, 2, gradient_checkpointing=True) < full / 10


def _model(trainable=500_000_000, frozen=0):
    return ModelMemory(trainable, trainable * 4, frozen, frozen * 2)


def test_plan_fits_and_picks_tokens_and_kv_budget():
    model = _model()  # 0.5B full fine-tune: 2 GB weights, 2 GB grads, 4 GB Adam
    rollout = RolloutNeeds(kv_bytes_per_token=12288, tokens=16 * 8 * 512, engine_weight_bytes=10**9,
                           overhead_bytes=GiB, headroom=1.2, offload_optimizer=True)
    plan = plan_memory(budget_bytes=20 * GiB, model=model, activation_bytes_per_token=100_000, sequence_tokens=512,
                       rollout=rollout, reserved_bytes=0)
    free = 20 * GiB - 8 * 10**9
    assert plan.micro_batch_tokens == (free // 100_000) // 512 * 512
    assert plan.micro_batch_sequences(512) == plan.micro_batch_tokens // 512
    assert plan.train_peak_bytes <= plan.budget_bytes
    assert plan.kv_cache_bytes == math.ceil(16 * 8 * 512 * 12288 * 1.2)  # the need with headroom, not all free
    assert plan.rollout_parts["optimizer states"] == 0  # offloaded while the engine is awake
    assert "KV cache" in plan.summary() and "activations" in plan.summary()
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
    capped = plan_memory(budget_bytes=20 * GiB, model=model, activation_bytes_per_token=100_000,
                         sequence_tokens=512, max_micro_batch_tokens=4 * 512, reserved_bytes=0)
    assert capped.micro_batch_tokens == 4 * 512 and capped.kv_cache_bytes is None


def test_plan_refuses_training_that_cannot_fit_and_names_the_parts():
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(budget_bytes=int(7.5 * GiB), model=_model(), activation_bytes_per_token=100_000,
                    sequence_tokens=512)
    msg = str(err.value)
    for part in ("train phase", "trainable weights", "gradients", "optimizer states", "activations of one sequence",
                 "What to change", "lora=", "gradient_checkpointing=True"):
        assert part in msg
    assert "1.86 GiB" in msg  # 500M fp32 weights


def test_plan_refuses_a_rollout_that_cannot_fit_unless_optimizer_is_offloaded():
    model = _model(10_000_000, 1_000_000_000)  # LoRA on a 1B base: 2 GB of bf16 weights
    needs = dict(kv_bytes_per_token=12288, tokens=64 * 8 * 1024, engine_weight_bytes=2 * 10**9, overhead_bytes=GiB)
    kw = dict(budget_bytes=12 * GiB, model=model, activation_bytes_per_token=50_000, sequence_tokens=1024,
              optimizer_bytes=4 * GiB)
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(rollout=RolloutNeeds(**needs, offload_optimizer=False), **kw)
    msg = str(err.value)
    for part in ("rollout phase", "KV cache (524288 tokens)", "engine weights", "optimizer states: 4.00 GiB",
                 "offload_optimizer=True", "num_generations"):
        assert part in msg
    plan = plan_memory(rollout=RolloutNeeds(**needs, offload_optimizer=True), **kw)
    assert plan.kv_cache_bytes >= 64 * 8 * 1024 * 12288


# ----------------------------------------------------------------------------- offload
def test_offload_and_restore_leave_optimizer_states_bit_identical():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    net(torch.randn(8, 16)).pow(2).mean().backward()  # gradients present too
    before = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items()}
    grads = [p.grad.clone() for p in net.parameters()]
    originals = {(id(p), k): v for p, s in opt.state.items() for k, v in s.items()}
    off = OptimizerOffloader(target="cpu")  # CPU -> CPU simulates the device -> pinned-host path
    moved = off.offload([opt], source="cpu")
    assert off.is_offloaded and moved > 0
    assert all(p.grad is None for p in net.parameters())
    assert all(v is not originals[(id(p), k)] for p, s in opt.state.items() for k, v in s.items())
    with pytest.raises(RuntimeError, match="already offloaded"):
        off.offload([opt], source="cpu")
    assert off.restore() == moved and not off.is_offloaded
    for p, s in opt.state.items():
        for k, v in s.items():
            ref = before[(id(p), k)]
            assert v.dtype == ref.dtype and v.device == ref.device
            assert torch.equal(v.view(torch.uint8) if v.dim() else v, ref.view(torch.uint8) if ref.dim() else ref)
    for p, g in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    opt.step()  # the optimizer still works on the restored states
    off.release_buffers()


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip():
    plugin = MemoryAwarePrecision()
    plugin.memory_plan = plan_memory(budget_bytes=4 * GiB, model=_model(1000, 1000), activation_bytes_per_token=10,
                                     sequence_tokens=8)
    plugin.planned_micro_batch_size = 3
    plugin.memory_stats = {"train": {"peak": 123}}
    state = plugin.state_dict()
    other = MemoryAwarePrecision()
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.warns(UserWarning, match="frozen_dtype"):
        MemoryAwarePrecision(frozen_dtype="float32").load_state_dict(state)


def test_plan_lowers_micro_batch_and_checkpoint_restores_it(tmp_path):
    module = _grpo(micro_batch_size=4)
    plugin = MemoryAwarePrecision(memory_budget=2 * GiB, activation_bytes_per_token=4 * 10**7)
    trainer = _trainer(plugin, steps=1)
    trainer.fit(module, PromptDataModule(train_data=ROWS, batch_size=2))
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
    _trainer(fresh, steps=2).fit(resumed, PromptDataModule(train_data=ROWS, batch_size=2), ckpt_path=path)
    assert resumed.micro_batch_size == 2 and fresh.memory_plan == plugin.memory_plan


# ----------------------------------------------------------------------------- fits
def test_grpo_fit_with_the_plugin_trains_fp32_lora_over_a_bf16_base():
    module = _grpo(lora={"r": 4, "lora_alpha": 8}, beta=0.05)
    plugin = MemoryAwarePrecision()
    trainer = _trainer(plugin, steps=2)
    trainer.fit(module, PromptDataModule(train_data=ROWS, batch_size=2))
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
        _trainer(MemoryAwarePrecision(memory_budget=10**6), steps=1).fit(
            module, PromptDataModule(train_data=ROWS, batch_size=2))
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

    trainer = _trainer(plugin, steps=3, callbacks=[cb, Check()])
    trainer.fit(module, PromptDataModule(train_data=ROWS, batch_size=2))
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
    trainer = _trainer(plugin, steps=1, callbacks=[cb])
    trainer.fit(module, PromptDataModule(train_data=ROWS, batch_size=2))
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
    ppo = PPO(reward_funcs=[dense_reward], model="tiny-llama", model_config=TINY, num_generations=2,
              sampling={"max_new_tokens": 4}, learning_rate=3e-3, num_iterations=1, num_mini_batches=1,
              micro_batch_size=4, chat_template=False, max_prompt_length=16)
    trainer = _trainer(MemoryAwarePrecision(), steps=1)
    trainer.fit(ppo, PromptDataModule(train_data=ROWS, batch_size=2))
    assert trainer.global_step >= 1
    rng = random.Random(0)
    pairs = []
    for _ in range(8):
        s = "".join(rng.choice("abcdef") for _ in range(4))
        pairs.append({"prompt": s, "chosen": "".join(sorted(s)), "rejected": "".join(sorted(s, reverse=True))})
    dpo = DPO(beta=0.1, model="tiny-llama", model_config=TINY, learning_rate=1e-3, lora={"r": 4, "lora_alpha": 8})
    trainer = _trainer(MemoryAwarePrecision(), steps=2)
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
    trainer = _trainer(MemoryAwarePrecision(), steps=2)
    trainer.fit(orpo, PreferenceDataModule(pairs, batch_size=4))
    assert trainer.global_step == 2
    assert all(p.dtype == torch.bfloat16 for p in orpo.policy.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in orpo.policy.parameters() if p.requires_grad)
    kto = KTO(model="tiny-llama", model_config=TINY, learning_rate=1e-3, lora={"r": 4, "lora_alpha": 8})
    trainer = _trainer(MemoryAwarePrecision(), steps=2)
    trainer.fit(kto, PreferenceDataModule(pairs, batch_size=4, mode="unpaired"))
    assert trainer.global_step == 2
    assert all(p.dtype == torch.bfloat16 for p in kto.policy.parameters() if not p.requires_grad)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


@pytest.mark.parametrize("fits_without", [True, False])
def test_optimizer_offload_is_automatic_only_when_the_rollout_needs_the_room(monkeypatch, fits_without):
    plugin = MemoryAwarePrecision()
    plugin.device_type = "cuda"
    calls = []

    def make_plan(module, optimizers, device):
        calls.append(plugin.offload_enabled)
        if not plugin.offload_enabled and not fits_without:
            raise MemoryPlanError("the rollout phase does not fit")
        return "plan"

    monkeypatch.setattr(plugin, "make_plan", make_plan)
    assert plugin.plan_with_auto_offload(None, [], torch.device("cuda")) == "plan"
    assert calls == ([False] if fits_without else [False, True])
    assert plugin.offload_enabled is (not fits_without)
    explicit = MemoryAwarePrecision(offload_optimizer=False)
    explicit.device_type = "cuda"
    monkeypatch.setattr(explicit, "make_plan", lambda *a: (_ for _ in ()).throw(MemoryPlanError("no")))
    with pytest.raises(MemoryPlanError):  # an explicit setting is kept, and the plan's error says what to change
        explicit.plan_with_auto_offload(None, [], torch.device("cuda"))


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
    _trainer(plugin, steps=1).fit(module, PromptDataModule(train_data=ROWS, batch_size=2))
    shape = provider.shapes[0]
    assert (shape.num_generations, shape.sequence_tokens, shape.generates) == (2, 20, True)
    plan = plugin.memory_plan
    assert plan.rollout_parts["engine weights"] == 10 * MiB
    assert plan.kv_cache_bytes == math.ceil(500 * 1000 * 1.5)
    assert plan.train_parts["engine weights (kept while the engine sleeps)"] == 3 * MiB


def test_plan_for_shape_without_an_engine_or_with_one_sized_by_a_gpu_fraction():
    shape = TrainingShape(model_config=QWEN_05B, sequence_tokens=512, max_prompt_tokens=256, max_new_tokens=256,
                          generates=True, num_generations=8, micro_batch_size=4)
    kw = dict(budget_bytes=40 * GiB, compute_dtype=torch.bfloat16, optimizer_bytes=4 * GiB, reserved_bytes=0)
    in_step = plan_for_shape(shape, _model(), prompts_per_step=16, **kw)
    assert in_step.rollout_parts["engine weights"] == 0  # transformers generates with the policy itself
    assert in_step.kv_cache_bytes == 16 * 8 * 512 * kv_bytes_per_token(QWEN_05B, 2)
    assert in_step.micro_batch_tokens == 4 * 512  # the fixed micro-batch bounds the plan
    fraction = RolloutMemory(engine_weight_bytes=GiB, weights_kept_asleep_bytes=GiB, sized_by_gpu_fraction=True)
    plan = plan_for_shape(shape, _model(), rollout=fraction, **kw)
    assert plan.rollout_parts == {} and plan.kv_cache_bytes is None  # vLLM takes its fraction itself
    assert plan.train_parts["engine weights (kept while the engine sleeps)"] == GiB
    offline = plan_for_shape(TrainingShape(QWEN_05B, 512, 512, 0), _model(), rollout=fraction, **kw)
    assert offline.rollout_parts == {} and "engine weights (kept while the engine sleeps)" in offline.train_parts
