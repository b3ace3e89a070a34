"""VLLMRollout with a fake engine on CPU, the importance-sampling math, and the vLLM engine's CPU-side errors."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_rl import GRPO, MemoryAwarePrecision, PromptDataModule, VLLMRollout
from lightning_rl.algorithms.importance import importance_weights, mismatch_stats
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.plugins.dtypes import trainer_compute_dtype
from lightning_rl.plugins.memory_plan import kv_bytes_per_token
from lightning_rl.prompting import PromptTooLongError
from lightning_rl.rollout import (
    EngineSettings,
    HFEngine,
    policy_weights,
    vllm_checks,
    vllm_internals,
    vllm_outputs,
    vllm_sizing,
)
from lightning_rl.rollout import vllm as vllm_mod


class FakeEngine:
    """Records calls; generates with transformers on the live policy."""

    def __init__(self, module, calls, needs_sync_after_sleep=False):
        self.calls = calls
        self.module = module
        self.inner = HFEngine(lambda: module.policy, module.tokenizer.pad_token_id, module.eos_token_ids)
        self.needs_sync = False
        self.needs_sync_after_sleep = needs_sync_after_sleep
        calls.append("create")

    def wake_up(self):
        self.calls.append("wake")

    def sync_weights(self, model):
        assert model is self.module.policy
        self.needs_sync = False
        self.calls.append("sync")

    def generate(self, prompt_ids, sampling, num_generations):
        self.calls.append("generate")
        return self.inner.generate(prompt_ids, sampling, num_generations)

    def sleep(self):
        self.calls.append("sleep")
        self.needs_sync = self.needs_sync_after_sleep

    def shutdown(self):
        self.calls.append("shutdown")


ROWS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)]


def _module(**kw):
    args = dict(reward_funcs=[lambda prompts, completions, **_: [float(len(c)) for c in completions]],
                model="tiny-llama", num_generations=2, sampling={"max_new_tokens": 4}, chat_template=False,
                micro_batch_size=4, max_prompt_length=32)
    args.update(kw)
    return GRPO(**args)


def _fit(callback, module, steps=3):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, datamodule=PromptDataModule(train_data=ROWS, batch_size=2))
    return trainer


def _settings(**settings):
    """A callback with these engine settings."""
    return VLLMRollout(settings=EngineSettings(**settings))


def _callback(calls, **kw):
    return VLLMRollout(engine_factory=lambda module, n, seed: FakeEngine(module, calls, **kw))


def test_order_and_one_sync_after_each_optimizer_step():
    torch.manual_seed(0)
    calls = []
    cb = _callback(calls)
    trainer = _fit(cb, _module())
    assert trainer.global_step == 3
    # created once with the policy's weights; step 0 needs no sync, every later batch follows one optimizer step
    assert calls == ["create", "wake", "generate", "sleep"] + ["wake", "sync", "generate", "sleep"] * 2 + ["shutdown"]
    assert cb.num_syncs == 2 and cb.last_synced_step == 2 and cb.engine is None


def test_sync_per_optimizer_step_with_mini_batches():
    calls = []
    cb = _callback(calls)
    trainer = _fit(cb, _module(num_mini_batches=2), steps=4)  # 2 optimizer steps per batch
    assert trainer.global_step == 4
    assert calls.count("generate") == 2 and calls.count("sync") == 1
    assert cb.last_synced_step == 2


def test_engine_that_dropped_its_weights_is_synced():
    calls = []
    _fit(_callback(calls, needs_sync_after_sleep=True), _module(), steps=2)
    assert calls == ["create", "wake", "generate", "sleep", "wake", "sync", "generate", "sleep", "shutdown"]


def test_rollout_is_attached_to_the_batch_and_used():
    calls = []
    module = _module()
    seen = []
    original = module.training_step

    def spy(batch, batch_idx):
        seen.append(batch.get("rollout"))
        return original(batch, batch_idx)

    module.training_step = spy
    _fit(_callback(calls), module, steps=1)
    assert seen and seen[0] is not None and seen[0].num_sequences == 4


def _hook_setup():
    calls = []
    module = _module()
    module.configure_model()
    cb = _callback(calls)
    trainer = SimpleNamespace(global_step=0, datamodule=None)
    module.log_dict = lambda *a, **k: None
    return calls, module, cb, trainer


def test_no_sync_when_weights_did_not_change():
    calls, module, cb, trainer = _hook_setup()
    for i in range(3):
        batch = {"prompt": ["1+1=", "2+2="]}
        cb.on_train_batch_start(trainer, module, batch, i)
        assert batch["rollout"].num_sequences == 4
    assert "sync" not in calls and calls.count("generate") == 3
    trainer.global_step = 1
    cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 3)
    assert calls[-4:] == ["wake", "sync", "generate", "sleep"]
    assert set(cb.last_timings) == {"wake_s", "sync_s", "generate_s", "sleep_s", "toggle_s"}


def test_sleeps_even_when_generation_fails():
    calls, module, cb, trainer = _hook_setup()
    cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 0)
    cb.engine.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 1)
    assert calls[-1] == "sleep"


def test_teardown_on_exception():
    calls = []
    cb = _callback(calls)

    def failing_reward(prompts, completions, **_):
        if failing_reward.n == 1:
            raise RuntimeError("reward server down")
        failing_reward.n += 1
        return [0.0] * len(completions)

    failing_reward.n = 0
    with pytest.raises(RuntimeError, match="reward server down"):
        _fit(cb, _module(reward_funcs=[failing_reward]), steps=3)
    assert calls[-1] == "shutdown" and calls.count("shutdown") == 1
    assert cb.engine is None


def test_state_dict_round_trip():
    cb = VLLMRollout(settings=EngineSettings(seed=7))
    cb.last_synced_step, cb.num_syncs, cb.num_rollouts = 5, 4, 6
    other = VLLMRollout()
    other.load_state_dict(cb.state_dict())
    assert other.settings.seed == 7 and other._restored_step == 5 and other.num_syncs == 4 and other.num_rollouts == 6
    seeds = []
    other.engine_factory = lambda module, n, seed: seeds.append(seed) or FakeEngine(module, [])
    module = _module()
    module.configure_model()
    other._create(SimpleNamespace(global_step=5), module, 2)
    assert seeds == [12]  # seed + last synced step: a resumed run does not replay the first rollouts


def test_batch_must_be_a_dict_with_prompts():
    calls, module, cb, trainer = _hook_setup()
    with pytest.raises(TypeError, match="'prompt'"):
        cb.on_train_batch_start(trainer, module, [1, 2], 0)


# ----------------------------------------------------------------------------- importance sampling
def test_token_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0]])
    w = importance_weights(trainer, engine, mask, "token", cap=2.0)
    # exp(0.5) = 1.6487, exp(-1.0) = 0.3679, masked -> 0
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))
    w_cap = importance_weights(trainer, engine, mask, "token", cap=1.5)
    torch.testing.assert_close(w_cap, torch.tensor([[1.5, math.exp(-1.0), 0.0]]))


def test_sequence_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-1.2, -2.1, -9.0], [-3.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = importance_weights(trainer, engine, mask, "sequence", cap=3.0)
    # row 0: exp(0.2 + 0.1) = 1.3499 on its two tokens; row 1: exp(2.0) = 7.39 -> capped at 3
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.3), math.exp(0.3), 0.0], [3.0, 3.0, 3.0]]))
    assert importance_weights(trainer, engine, mask, "none").tolist() == mask.float().tolist()


def test_importance_weights_do_not_overflow_and_carry_no_gradient():
    trainer = torch.tensor([[500.0, 0.0]], requires_grad=True)
    w = importance_weights(trainer, torch.zeros(1, 2), torch.ones(1, 2), "sequence", cap=2.0)
    assert torch.isfinite(w).all() and w.tolist() == [[2.0, 2.0]] and not w.requires_grad
    with pytest.raises(ValueError, match="one of"):
        importance_weights(trainer, trainer, torch.ones(1, 2), "tokens")
    with pytest.raises(ValueError, match="> 0"):
        importance_weights(trainer, trainer, torch.ones(1, 2), "token", cap=0)


def test_mismatch_stats_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -9.0]])
    stats = mismatch_stats(trainer, engine, torch.tensor([[1, 1, 0]]))
    assert stats["logprob_mismatch_mean"] == pytest.approx(0.75)
    assert stats["logprob_mismatch_max"] == pytest.approx(1.0)
    assert mismatch_stats(trainer, engine, torch.zeros(1, 3))["logprob_mismatch_max"] == 0.0


def test_grpo_importance_sampling_trains_and_logs_mismatch():
    calls = []
    module = _module(importance_sampling="token", importance_sampling_cap=2.0)
    trainer = _fit(_callback(calls), module, steps=2)
    logged = trainer.callback_metrics
    assert "train/logprob_mismatch_mean" in logged and "train/importance_weight" in logged
    # the fake engine samples from the live policy: no mismatch, weights 1
    assert float(logged["train/logprob_mismatch_mean"]) < 1e-4
    assert float(logged["train/importance_weight"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="importance_sampling"):
        _module(importance_sampling="tokens")


# ----------------------------------------------------------------------------- vLLM engine, CPU-side
def test_vllm_missing_says_which_extra(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", False)
    model, _ = load_policy("tiny-llama")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-rl\[vllm\]'"):
        vllm_mod.VLLMEngine(model, [1], 0, 64)


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_policy("tiny-llama")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        vllm_mod.VLLMEngine(model, [1], 0, 64)


def test_callback_without_vllm_fails_at_fit_start_with_the_extra(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="lightning-rl"):
        _fit(VLLMRollout(), _module(), steps=1)


def test_unsupported_architecture_and_long_prompt_errors():
    with pytest.raises(vllm_checks.UnsupportedArchitectureError, match="model_impl"):
        vllm_checks.check_architecture("MyOwnForCausalLM", {"LlamaForCausalLM"})
    vllm_checks.check_architecture("LlamaForCausalLM", {"LlamaForCausalLM"})
    vllm_checks.check_architecture("MyOwnForCausalLM", set(), model_impl="transformers")
    with pytest.raises(PromptTooLongError, match="max_model_len is 8"):
        vllm_checks.check_prompt_lengths([[1] * 3, [1] * 8], 8)


def test_execution_modes_map_to_vllm_arguments():
    assert vllm_sizing.execution_kwargs("eager") == {"enforce_eager": True}
    graphs = vllm_sizing.execution_kwargs("cuda_graphs")
    assert graphs["enforce_eager"] is False
    assert graphs["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}  # no torch.compile
    assert vllm_sizing.execution_kwargs("compiled") == {"enforce_eager": False}  # vLLM's defaults


def test_bad_execution_mode_is_refused_before_vllm(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", True)
    monkeypatch.setattr(vllm_mod.torch.cuda, "is_available", lambda: True)
    model, tok = load_policy("tiny-llama")
    with pytest.raises(ValueError, match="execution must be one of"):
        vllm_mod.VLLMEngine(model, [tok.eos_token_id], tok.pad_token_id, 64,
                            settings=EngineSettings(execution="graphs"))


def test_sharing_base_weights_without_a_lora_adapter_is_refused_before_vllm(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", True)
    monkeypatch.setattr(vllm_mod.torch.cuda, "is_available", lambda: True)
    model, tok = load_policy("tiny-llama")
    with pytest.raises(ValueError, match="share_base_weights=True needs a LoRA policy"):
        vllm_mod.VLLMEngine(model, [tok.eos_token_id], tok.pad_token_id, 64,
                            settings=EngineSettings(share_base_weights=True))


def test_sampled_logprobs_from_flat_and_dict_formats():
    flat = SimpleNamespace(start_indices=[0, 1, 2], token_ids=[5, 9, 2], logprobs=[-0.5, -1.25, -3.0])
    assert vllm_outputs.sampled_logprobs(flat, [5, 9, 2]) == [-0.5, -1.25, -3.0]
    with pytest.raises(RuntimeError, match="sampled token 7"):
        vllm_outputs.sampled_logprobs(flat, [5, 7, 2])
    dicts = [{5: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.25)}]
    assert vllm_outputs.sampled_logprobs(dicts, [5, 9]) == [-0.5, -1.25]
    assert vllm_outputs.sampled_logprobs(None, [5, 9]) == [0.0, 0.0]


def test_kv_cache_budget_from_rollout_shape():
    model, _ = load_policy("tiny-llama")  # 2 layers, 2 KV heads, head dim 16
    per_token = 2 * 2 * 2 * 16 * 2  # K and V, bf16
    got = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, headroom=1.0)
    assert got == (16 * 100 + 128 * (128 + 16)) * per_token
    unshared = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, 1.0, shared_prompts=False)
    assert unshared == (128 * 100 + 128 * (128 + 16)) * per_token
    assert vllm_sizing.kv_cache_bytes_for(model.config, 1, 1, 10, 10, torch.float32, 1.5) >= 36 * per_token * 2


def test_lora_weights_for_the_engine():
    torch.manual_seed(0)
    base, _ = load_policy("tiny-llama")
    peft = apply_lora(base, {"r": 4, "lora_alpha": 8})
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert policy_weights.adapter_sync_unsupported_reason(peft) is None
    merged = dict(policy_weights.merged_lora_weights(peft))
    reference = {k: v for k, v in peft.merge_and_unload(progressbar=False).state_dict().items()}
    assert set(merged) == {k for k in reference if k != "lm_head.weight"}  # tied head: not a parameter
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)


def test_lora_base_and_adapter_tensors():
    base, _ = load_policy("tiny-llama")
    plain = dict(policy_weights.full_weights(base))
    peft = apply_lora(base, {"r": 4, "lora_alpha": 8})
    assert set(dict(policy_weights.base_weights(peft))) == set(plain)
    tensors, config = policy_weights.adapter_tensors(peft)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    dora = apply_lora(load_policy("tiny-llama")[0], {"r": 4, "use_dora": True})
    assert "DoRA" in policy_weights.adapter_sync_unsupported_reason(dora)


def test_weights_kept_asleep_follow_the_engines_sync_mode_and_sleep_level():
    net, _ = load_policy("tiny-llama")
    full_bytes = sum(p.numel() for p in net.parameters()) * 4  # fp32 policy, engine dtype "auto"
    assert vllm_sizing.lora_sync_mode(net, "auto") == (None, None)
    assert VLLMRollout().weights_kept_asleep_bytes(net) == full_bytes  # small: level 0 keeps them
    assert _settings(dtype="bfloat16").weights_kept_asleep_bytes(net) == full_bytes // 2
    assert _settings(keep_weights_bytes=0).weights_kept_asleep_bytes(net) == 0  # level 2 drops them
    assert _settings(sleep_level=1, keep_weights_bytes=0).weights_kept_asleep_bytes(net) == 0
    assert _settings(sleep_level=0, keep_weights_bytes=0).weights_kept_asleep_bytes(net) == full_bytes
    peft = apply_lora(net, {"r": 4, "lora_alpha": 8})
    assert vllm_sizing.lora_sync_mode(peft, "auto") == ("adapter", None)
    assert vllm_sizing.lora_sync_mode(peft, "merged") == ("merged", None)
    assert VLLMRollout().weights_kept_asleep_bytes(peft) == 0  # adapter sync: the base waits in CPU memory
    merged = sum(p.numel() for p in peft.get_base_model().parameters()) * 4
    assert _settings(lora_sync="merged").weights_kept_asleep_bytes(peft) == merged


def test_engine_dtype_follows_the_trainers_compute_dtype():
    net, _ = load_policy("tiny-llama")  # fp32 weights
    bf16_mixed = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(precision_plugin=None))
    full = SimpleNamespace(precision="32-true", strategy=SimpleNamespace(precision_plugin=None))
    plugin = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(precision_plugin=MemoryAwarePrecision()))
    assert trainer_compute_dtype(bf16_mixed) == torch.bfloat16
    assert trainer_compute_dtype(plugin) == torch.bfloat16
    assert trainer_compute_dtype(full) is None and trainer_compute_dtype(None) is None
    cb = VLLMRollout()
    assert cb.engine_dtype(net, bf16_mixed) == torch.bfloat16  # fp32 masters, bf16 products: a bf16 engine
    assert cb.engine_dtype(net, plugin) == torch.bfloat16
    assert cb.engine_dtype(net, full) == torch.float32  # a trainer in full precision keeps an fp32 engine
    assert _settings(dtype="float32").engine_dtype(net, bf16_mixed) == torch.float32  # explicit wins
    full_bytes = sum(p.numel() for p in net.parameters()) * 4
    assert cb.weights_kept_asleep_bytes(net, bf16_mixed) == full_bytes // 2


def test_lora_adapters_never_get_an_fp32_engine():
    net, _ = load_policy("tiny-llama")
    peft = apply_lora(net, {"r": 4, "lora_alpha": 8})
    # vLLM's LoRA kernels take 16-bit adapters: "auto" over fp32 weights and an fp32 trainer gives bf16
    assert vllm_sizing.engine_weight_dtype(peft, "auto", None, adapter=True) == torch.bfloat16
    assert VLLMRollout().engine_dtype(peft, None) == torch.bfloat16
    assert _settings(lora_sync="merged").engine_dtype(peft, None) == torch.float32  # merged weights may be fp32
    with pytest.raises(ValueError, match="16-bit engine.*bfloat16.*merged"):
        _settings(dtype="float32").engine_dtype(peft, None)


def test_importance_sampling_auto_corrects_only_rollouts_of_another_engine():
    module = _module()
    module.configure_model()
    rollout = module.generate_rollout(["say 1", "say 2"])
    assert module.importance_sampling == "auto"
    assert module.importance_level(rollout) == "none"  # the policy sampled it itself
    rollout.extras["engine"] = "vllm"
    assert module.importance_level(rollout) == "token"
    assert _module(importance_sampling="sequence").importance_level(rollout) == "sequence"
    with pytest.raises(ValueError, match="'auto' or one of"):
        _module(importance_sampling="tokens")


def test_rollout_memory_counts_the_kv_cache_the_engine_gets():
    module = _module()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=None)
    cb = VLLMRollout(prompts_per_step=2)
    cb.setup(trainer, module, "fit")
    shape = module.training_shape()
    memory = cb.rollout_memory(shape)
    per_token = kv_bytes_per_token(module.policy.config, 2)  # a bf16 engine under bf16-mixed
    assert memory.kv_bytes_per_token == per_token and not memory.sized_by_gpu_fraction
    engine_kv = vllm_sizing.kv_cache_bytes_for(module.policy.config, 2, 2, 32, 4, torch.bfloat16, 1.2)
    assert math.ceil(memory.kv_tokens * memory.headroom) * per_token == engine_kv  # what build_engine gives it
    assert memory.engine_weight_bytes == sum(p.numel() for p in module.policy.parameters()) * 2
    assert memory.weights_kept_asleep_bytes == memory.engine_weight_bytes  # small: level 0 keeps them
    fixed = VLLMRollout(prompts_per_step=2, settings=EngineSettings(kv_cache_bytes=100 * per_token))
    fixed.setup(trainer, module, "fit")
    assert (fixed.rollout_memory(shape).kv_tokens, fixed.rollout_memory(shape).headroom) == (100, 1.0)
    fraction = VLLMRollout(settings=EngineSettings(gpu_memory_utilization=0.3))
    fraction.setup(trainer, module, "fit")
    assert fraction.rollout_memory(shape).sized_by_gpu_fraction and fraction.rollout_memory(shape).kv_tokens == 0


def test_engine_settings_are_checked_when_built():
    for bad, match in (({"sleep_level": 3}, "sleep_level"), ({"lora_sync": "both"}, "lora_sync"),
                       ({"dtype": "int8"}, "dtype"), ({"kv_cache_headroom": 0.5}, "headroom"),
                       ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization")):
        with pytest.raises(ValueError, match=match):
            EngineSettings(**bad)
