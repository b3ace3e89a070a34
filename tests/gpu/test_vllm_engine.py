"""The colocated vLLM engine on SmolLM2-135M-Instruct (real weights) against transformers, on a GPU."""

import copy
import gc
import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402

from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout  # noqa: E402
from lightning_rl.logprobs import completion_logprobs  # noqa: E402
from lightning_rl.lora import apply_lora  # noqa: E402
from lightning_rl.models import load_policy  # noqa: E402
from lightning_rl.prompting import encode_prompts  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings, HFEngine, SamplingConfig  # noqa: E402
from lightning_rl.rollout.vllm import VLLMEngine  # noqa: E402

# vLLM's sleep mode allows one engine per process: bench/gpu_run.sh runs each of these in its own process
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [
    "What is 12 + 7?",
    "Name three colors.",
    "Write one sentence about rain.",
    "What is the capital of France?",
    "Count from 1 to 5.",
    "Say hello in Spanish.",
]
GIB = 1 << 30


@pytest.fixture(scope="module")
def smol():
    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    return model.cuda().eval(), tok


def _eos(model, tok):
    ids = {tok.eos_token_id}
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return sorted(i for i in ids if i is not None)


def _engine(model, tok, **settings):
    settings = {"kv_cache_bytes": GIB // 2, "execution": "eager", **settings}
    return VLLMEngine(model, _eos(model, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                      settings=EngineSettings(**settings))


def _rows(rollout):
    return [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]


def _used():
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def test_greedy_matches_transformers(smol):
    model, tok = smol
    ids = encode_prompts(tok, PROMPTS)
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    engine = _engine(model, tok, dtype="float32")
    try:
        got = _rows(engine.generate(ids, greedy, 1))
    finally:
        engine.shutdown()
    want = _rows(HFEngine(model, tok.pad_token_id, _eos(model, tok)).generate(ids, greedy, 1))
    same = sum(a == b for a, b in zip(got, want))
    print(f"greedy: {same}/{len(want)} completions identical to transformers")
    assert got == want


def test_a_kv_cache_short_of_the_rollout_generates_it_in_waves(smol):
    """The memory plan's waves: a KV cache for two whole sequences, ``max_num_seqs`` two, six prompts."""
    from lightning_rl.plugins.memory_plan import kv_bytes_per_token
    from lightning_rl.rollout.vllm_sizing import sequences_at_once

    model, tok = smol
    ids = encode_prompts(tok, PROMPTS)
    max_len = 160
    per_token = kv_bytes_per_token(model.config, 4)
    kv = 2 * (max_len + 16) * per_token
    assert sequences_at_once(kv, per_token, max_len, sequences=6 * 4) == 2
    engine = VLLMEngine(model, _eos(model, tok), tok.pad_token_id, max_model_len=max_len, max_num_seqs=2,
                        settings=EngineSettings(kv_cache_bytes=kv, execution="eager", dtype="float32"))
    try:
        greedy = _rows(engine.generate(ids, SamplingConfig(max_new_tokens=64, temperature=0.0), 1))
        sampled = engine.generate(ids, SamplingConfig(max_new_tokens=64, temperature=1.0), 4, seed=3)
    finally:
        engine.shutdown()
    want = _rows(HFEngine(model, tok.pad_token_id, _eos(model, tok)).generate(
        ids, SamplingConfig(max_new_tokens=64, temperature=0.0), 1))
    lengths = sampled.completion_mask.sum(1)
    print(f"waves of 2: greedy {sum(a == b for a, b in zip(greedy, want))}/{len(want)} as transformers; "
          f"sampled lengths {lengths.tolist()}")
    assert greedy == want
    assert sampled.completion_ids.shape[0] == 6 * 4 and bool((lengths > 0).all())
    logps = sampled.sampling_logprobs[sampled.completion_mask.bool()]
    assert bool(torch.isfinite(logps).all()) and bool((logps <= 0).all())


def _trainer_logprobs(net, rollout, autocast):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        lp, _ = completion_logprobs(
            net,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=1.0,
            backend="reference",
        )
    return lp


def _mismatch(engine, net, ids, sampling, autocast, seed=0):
    """Mean |engine log-prob - trainer log-prob| over the sampled completion tokens."""
    r = engine.generate(ids, sampling, 4, seed=seed).to("cuda")
    m = r.completion_mask.bool()
    return (_trainer_logprobs(net, r, autocast) - r.sampling_logprobs)[m].abs().mean().item()


def _bf16_noise(net, engine, ids, sampling, seed=0):
    """Mean |log p in pure bf16 - log p in fp32| of the same weights on the engine's sampled tokens."""
    r = engine.generate(ids, sampling, 4, seed=seed).to("cuda")
    m = r.completion_mask.bool()
    bf16 = _trainer_logprobs(copy.deepcopy(net).to(torch.bfloat16), r, autocast=False)
    return (bf16 - _trainer_logprobs(net, r, autocast=False))[m].abs().mean().item()


def _step(trainer, engine, ids, sampling, autocast):
    """One AdamW step of the trainer on the engine's samples (maximum likelihood, lr 3e-4)."""
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-4)
    r = engine.generate(ids, sampling, 2, seed=1).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        lp, _ = completion_logprobs(trainer, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    (-(lp * r.completion_mask).sum() / r.completion_mask.sum()).backward()
    opt.step()


def _stale_then_synced(engine, trainer, ids, sampling, autocast, before_sync=None):
    """Mismatch after one :func:`_step` without a sync, then after ``before_sync()`` (if any) and a sync."""
    _step(trainer, engine, ids, sampling, autocast=autocast)
    stale = _mismatch(engine, trainer, ids, sampling, autocast=autocast)
    if before_sync is not None:
        before_sync()
    engine.sync_weights(trainer)
    return stale, _mismatch(engine, trainer, ids, sampling, autocast=autocast)


def test_fp32_engine_logprobs_match_the_trainer_after_step_and_sync(smol):
    """The issue's check that a sync carries the trained weights: fixed-seed samples, step, sync, compare."""
    model, tok = smol
    trainer = copy.deepcopy(model).train()  # fp32 weights and fp32 compute (precision="32-true")
    engine = _engine(trainer, tok, dtype="float32", kv_cache_bytes=GIB, execution="cuda_graphs")
    try:
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, trainer, ids, sampling, autocast=False)
        stale, after = _stale_then_synced(engine, trainer, ids, sampling, autocast=False,
                                          before_sync=lambda: (engine.sleep(), engine.wake_up()))
        print(
            f"mean |delta logp| engine fp32 vs trainer fp32: start {start:.5f}, after a step without sync "
            f"{stale:.4f}, after sleep + sync {after:.5f}"
        )
        assert stale > 0.1  # the step moved the trainer far from the engine's old weights
        assert after < 0.02  # the bound, met with fp32 on both sides
        assert after < stale / 20
    finally:
        engine.shutdown()


def test_sleep_frees_memory_and_logprobs_match_after_step_and_sync(smol):
    model, tok = smol
    # the trainer as MemoryAwarePrecision runs it: fp32 master weights, compute under bf16 autocast
    trainer = copy.deepcopy(model).train()
    before = _used()
    # eager: under execution="cuda_graphs" the graphs' private pool stays allocated while asleep
    # (measured on an H100 with this 2 GiB KV cache: 86.4% freed, against 90.3-93.8% eager)
    engine = _engine(trainer, tok, dtype="bfloat16", kv_cache_bytes=2 * GIB, execution="eager", sleep_level=2)
    try:
        engine_mem = _used() - before
        engine.sleep()
        freed = engine_mem - (_used() - before)
        print(f"sleep: engine {engine_mem / GIB:.2f} GiB, freed {freed / GIB:.2f} GiB ({freed / engine_mem:.1%})")
        assert freed >= 0.9 * engine_mem
        engine.wake_up()
        assert engine.needs_sync  # level 2: the weights were dropped
        engine.sync_weights(trainer)

        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, trainer, ids, sampling, autocast=True)
        stale, after = _stale_then_synced(engine, trainer, ids, sampling, autocast=True)
        fp32 = _mismatch(engine, trainer, ids, sampling, autocast=False)
        noise = _bf16_noise(trainer, engine, ids, sampling)
        print(
            f"mean |delta logp| engine bf16 vs trainer fp32-master+bf16-autocast: start {start:.4f}, after a step "
            f"without sync {stale:.4f}, after sync {after:.4f}; vs trainer in fp32 {fp32:.4f}; "
            f"the model's own bf16 noise (pure bf16 vs fp32, no engine) {noise:.4f}"
        )
        assert stale > 5 * after  # the sync took: without it the engine is far off
        assert abs(after - start) < 0.01  # and back to the agreement before the step
        # A bf16 engine cannot beat the model's bf16 noise floor: on an H100 that floor is about 0.03 on
        # sampled tokens, so the 0.02 holds only with fp32 on both sides (the test above).
        assert after < 1.5 * noise
    finally:
        engine.shutdown()
        gc.collect()
        torch.cuda.empty_cache()


def test_lora_adapter_sync_matches_merged_weights(smol):
    model, tok = smol
    torch.manual_seed(0)
    peft = apply_lora(copy.deepcopy(model), {"r": 16, "lora_alpha": 32})
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = encode_prompts(tok, PROMPTS)
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    engine = _engine(
        peft,
        tok,
        dtype="bfloat16",
        lora_sync="adapter",  # vLLM's LoRA kernels take bf16/fp16
        share_base_weights=False,
    )
    try:
        assert engine.lora_mode == "adapter" and engine.sleep_level == 1
        adapter = _rows(engine.generate(ids, greedy, 1))
        request, engine._lora_request = engine._lora_request, None
        base = _rows(engine.generate(ids, greedy, 1))
        engine._lora_request = request
        # the adapter survives a sleep (level 1 keeps the base weights) and a re-sync of new adapter values
        engine.sleep()
        engine.wake_up()
        engine.sync_weights(peft)
        again = _rows(engine.generate(ids, greedy, 1))
        engine.lora_mode = "merged"  # now push W + BA and generate without the adapter
        engine.sync_weights(peft)
        assert engine._lora_request is None
        merged = _rows(engine.generate(ids, greedy, 1))
    finally:
        engine.shutdown()
    same = sum(a == b for a, b in zip(adapter, merged))
    again_same = sum(a == b for a, b in zip(again, adapter))
    print(
        f"lora: adapter vs merged {same}/{len(merged)} identical; differs from base in "
        f"{sum(a != b for a, b in zip(adapter, base))}/{len(base)}; re-synced adapter {again_same}/{len(adapter)}"
    )
    assert adapter != base
    # vLLM's LoRA kernels do not promise bit-identical runs: on an H100 a re-run completion took
    # another greedy branch at token 11 of 32. Allow one of six to diverge, as for merged weights.
    assert again_same >= len(adapter) - 1
    # bf16: W + BA rounds once where the adapter path adds BAx in the activations; allow one greedy divergence
    assert same >= len(merged) - 1


def _lora_bf16(model, seed=0):
    torch.manual_seed(seed)
    peft = apply_lora(copy.deepcopy(model).to(torch.bfloat16), {"r": 16, "lora_alpha": 32})
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft


def _lora_prompts_and_logits(model, tok):
    """A bf16 LoRA policy, the prompts' ids, a batch of the first one and the policy's logits on it."""
    peft = _lora_bf16(model)
    ids = encode_prompts(tok, PROMPTS)
    batch = torch.tensor([ids[0]], device="cuda")
    with torch.no_grad():
        return peft, ids, batch, peft(input_ids=batch).logits.float()


def test_lora_base_weights_shared_with_the_engine(smol):
    tok = smol[1]
    peft, ids, batch, logits_before = _lora_prompts_and_logits(*smol)
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    gc.collect()
    torch.cuda.empty_cache()
    used_before = _used()
    engine = _engine(
        peft,
        tok,
        dtype="bfloat16",
        lora_sync="adapter",
        share_base_weights=True,
        execution="cuda_graphs",
        kv_cache_bytes=GIB,
    )
    try:
        shared = engine.shared.bytes_shared
        trainer_freed, released = engine.shared_freed_bytes, engine.shared_released_bytes
        rise = _used() - used_before
        print(f"shared base: {shared / 2**20:.1f} MiB; trainer allocator freed {trainer_freed / 2**20:.1f} MiB, "
              f"gave the driver {released / 2**20:.1f} MiB; device memory rose {rise / GIB:.2f} GiB at the start")
        assert shared > 200 * 2**20  # SmolLM2-135M in bf16: ~257 MiB without the tied head
        assert trainer_freed >= 0.9 * shared  # the trainer's copy left before the engine loaded its own
        assert released >= 0.9 * trainer_freed  # and went back to the driver, not into PyTorch's cache
        assert all(p.device.type == "cuda" for p in peft.parameters())
        for p, view in engine.shared.views.values():
            assert p.data_ptr() == view.data_ptr()
        with torch.no_grad():
            assert torch.equal(peft(input_ids=batch).logits.float(), logits_before)

        first = _rows(engine.generate(ids, greedy, 1))
        awake = _used()
        engine.sleep()  # only the KV cache goes; the trainer keeps reading the weights
        freed = awake - _used()
        print(f"kv-only sleep freed {freed / GIB:.2f} GiB")
        assert freed >= 0.9 * GIB
        with torch.no_grad():
            assert torch.equal(peft(input_ids=batch).logits.float(), logits_before)
        engine.wake_up()
        again = _rows(engine.generate(ids, greedy, 1))  # KV cache came back usable, weights intact
        print(
            f"after a KV-only sleep: {sum(a == b for a, b in zip(again, first))}/{len(first)} greedy completions "
            "identical"
        )
        assert sum(a == b for a, b in zip(again, first)) >= len(first) - 1  # LoRA kernels: see the test above

        with torch.no_grad():  # a "training step" on the adapter, then an adapter-only sync
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        engine.sleep()
        engine.wake_up()
        engine.sync_weights(peft)
        changed = _rows(engine.generate(ids, greedy, 1))
        differ = sum(a != b for a, b in zip(changed, first))
        print(f"after the adapter changed and synced: {differ}/{len(first)} greedy completions differ")
        assert differ >= 2  # more than the one divergence re-runs of the same adapter showed
        with torch.no_grad():
            logits_trained = peft(input_ids=batch).logits.float()
    finally:
        engine.shutdown()
    assert not engine.shared.views  # the trainer got private copies back before the engine went away
    with torch.no_grad():
        assert torch.equal(peft(input_ids=batch).logits.float(), logits_trained)


def test_a_parked_base_goes_back_to_the_gpu_when_sharing_fails(smol, monkeypatch):
    import lightning_rl.rollout.vllm as vllm_engine

    tok = smol[1]
    peft, ids, batch, logits_before = _lora_prompts_and_logits(*smol)
    monkeypatch.setattr(vllm_engine, "share_base_with_engine",
                        lambda *a: (vllm_engine.SharedBaseWeights(), "refused by the test"))
    engine = _engine(peft, tok, dtype="bfloat16", lora_sync="adapter")  # share_base_weights=None: try, fall back
    try:
        assert not engine.shared.views and engine.shared_freed_bytes == 0
        assert all(p.device.type == "cuda" for p in peft.parameters())  # the parked base came back
        with torch.no_grad():
            assert torch.equal(peft(input_ids=batch).logits.float(), logits_before)
        assert len(_rows(engine.generate(ids, SamplingConfig(max_new_tokens=8, temperature=0.0), 1))) == len(ids)
    finally:
        engine.shutdown()


def test_share_base_weights_true_raises_when_sharing_fails_and_the_base_is_back_on_the_gpu(smol, monkeypatch):
    import lightning_rl.rollout.vllm as vllm_engine

    model, tok = smol
    peft = _lora_bf16(model)
    monkeypatch.setattr(vllm_engine, "share_base_with_engine",
                        lambda *a: (vllm_engine.SharedBaseWeights(), "refused by the test"))
    with pytest.raises(ValueError, match="refused by the test"):  # one sleep-mode engine per process: its own test
        _engine(peft, tok, dtype="bfloat16", lora_sync="adapter", share_base_weights=True)
    assert all(p.device.type == "cuda" for p in peft.parameters())


def test_grpo_lora_fit_with_shared_base_and_the_memory_plugin():
    from lightning_rl.plugins import MemoryAwarePrecision

    torch.manual_seed(0)
    module = GRPO(
        reward_funcs=[NumericMatch()],
        model="smollm2-135m-instruct",
        dtype="bfloat16",
        lora={"r": 16, "lora_alpha": 32},
        num_generations=4,
        sampling={"max_new_tokens": 32},
        micro_batch_size=16,
        max_prompt_length=128,
        learning_rate=1e-4,
        importance_sampling="token",
    )
    callback = VLLMRollout(settings=EngineSettings(share_base_weights=True))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        plugins=[MemoryAwarePrecision()],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=24, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("grpo lora fit:", {k: round(v, 4) for k, v in metrics.items() if "mismatch" in k or "rollout/" in k})
    assert trainer.global_step == 3 and callback.num_syncs == 2
    assert not callback.overlapping  # share_base_weights=True keeps the engine in this process, between updates
    assert metrics["train/logprob_mismatch_mean"] < 0.05
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_grpo_fit_with_the_callback():
    torch.manual_seed(0)
    module = GRPO(
        reward_funcs=[NumericMatch()],
        model="smollm2-135m-instruct",
        dtype="bfloat16",
        num_generations=4,
        sampling={"max_new_tokens": 32},
        micro_batch_size=16,
        max_prompt_length=128,
        learning_rate=1e-5,
        importance_sampling="token",
    )
    callback = VLLMRollout(overlap=False)  # the in-process engine between updates; CUDA graphs, fp32 LM head
    states = {}
    create = callback._create

    def random_states():
        _, keys, pos, *_ = np.random.get_state()
        return torch.get_rng_state(), torch.cuda.get_rng_state(), random.getstate(), (keys.tolist(), pos)

    def create_recording_random_states(*args):  # vLLM seeds the global random states of a process it starts in
        # every state one draw past a fresh seed 0 (the engine's seed), so a reseed cannot leave it as it was
        torch.rand(1), torch.rand(1, device="cuda"), random.random(), np.random.rand()
        states["before"] = random_states()
        create(*args)
        states["after"] = random_states()

    callback._create = create_recording_random_states
    trainer = L.Trainer(
        max_steps=2,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("grpo fit:", {k: round(v, 4) for k, v in metrics.items() if "mismatch" in k or "rollout/" in k},
          f"engine start {callback.engine_start_bytes / 2**30:.2f} GiB")
    assert trainer.global_step == 2
    assert callback.num_rollouts == 2 and callback.num_syncs == 1
    assert callback.engine_start_bytes > 0  # the engine's weights, KV cache and workspace
    assert callback.engine is None  # teardown shut it down
    assert metrics["train/logprob_mismatch_mean"] < 0.05
    # the engine's start left the training's random states as they were
    (cpu, cuda, py, numpy), (cpu_after, cuda_after, py_after, numpy_after) = states["before"], states["after"]
    assert torch.equal(cpu, cpu_after) and torch.equal(cuda, cuda_after)
    assert py == py_after and numpy == numpy_after


@pytest.mark.parametrize("precision", ["bf16-mixed", "memory-plugin"])
def test_grpo_lora_fit_with_fp32_adapters_and_the_default_engine_dtype(precision):
    """fp32 LoRA adapters (the default dtype) reach vLLM's 16-bit LoRA kernels cast to the engine's bf16."""
    from lightning_rl.plugins import MemoryAwarePrecision

    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], model="smollm2-135m-instruct", lora={"r": 16, "lora_alpha": 32},
                  num_generations=4, sampling={"max_new_tokens": 32}, max_prompt_length=128,
                  learning_rate=1e-4)
    callback = VLLMRollout(overlap=False)  # the adapter into vLLM's LoRA kernels (with overlap the engine merges)
    modes = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            modes.append(callback.engine.lora_mode)

    extra = {"plugins": [MemoryAwarePrecision()]} if precision == "memory-plugin" else {"precision": "bf16-mixed"}
    trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Watch()],
                        limit_val_batches=0, **extra)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=24, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"grpo lora fit ({precision}):", {k: round(v, 4) for k, v in metrics.items() if "mismatch" in k})
    assert any(p.dtype == torch.float32 for n, p in module.policy.named_parameters() if "lora_" in n)
    assert trainer.global_step == 3 and callback.num_syncs == 2
    assert not callback.overlapping and modes == ["adapter"] * 3  # vLLM's LoRA kernels ran the fp32 adapter
    assert metrics["train/logprob_mismatch_mean"] < 0.05
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_the_readme_gpu_configuration_trains_in_train_mode_with_its_planned_defaults():
    """``GRPO`` defaults + ``VLLMRollout()`` + ``MemoryAwarePrecision()``, as the README's GPU snippet writes it."""
    from lightning_rl.plugins import MemoryAwarePrecision

    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    callback = VLLMRollout()
    modes = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            modes.append(pl_module.policy.training)

    trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Modes()],
                        plugins=[MemoryAwarePrecision()], limit_val_batches=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=48, num_val=4, batch_size=8))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("readme config:", {"micro_batch_tokens": module.micro_batch_tokens,
                             "gradient_checkpointing": module.gradient_checkpointing,
                             **{k: round(v, 4) for k, v in metrics.items() if "mismatch" in k or "memory/" in k}})
    assert modes == [True, True, True]
    assert module.gradient_checkpointing is True and module.micro_batch_size is None
    assert module.micro_batch_tokens and module.micro_batch_tokens >= 1024
    assert callback.overlapping  # the next rollout is generated during each update, one optimizer step old
    assert metrics["train/logprob_mismatch_mean"] < 0.15  # numerics plus one step's change of the policy
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
