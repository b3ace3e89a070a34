"""The vLLM engine in its own process (weights read through CUDA IPC) and the overlapped rollout, on a GPU."""

import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402

from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout  # noqa: E402
from lightning_rl.plugins.memory_plan import planned_engine_bytes  # noqa: E402
from lightning_rl.prompting import encode_prompts  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings, SamplingConfig  # noqa: E402
from lightning_rl.rollout.vllm_process import VLLMProcessEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_vllm_engine import PROMPTS, _eos, _mismatch, _stale_then_synced, _step  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GIB = 1 << 30


def _gpu_children():
    """This process's children that hold GPU memory (an engine process; not compile workers or trackers)."""
    import psutil
    import pynvml

    pynvml.nvmlInit()
    on_gpu = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))}
    return [c.pid for c in psutil.Process().children(recursive=True) if c.pid in on_gpu]


@pytest.mark.parametrize("front_end", ["trainer", "process"])
def test_engine_process_reads_the_trained_weights_at_each_sync(front_end):
    from lightning_rl.models import load_policy

    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    trainer = model.cuda().train()  # fp32 weights and compute: the tightest comparison
    engine = VLLMProcessEngine(trainer, _eos(trainer, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                               settings=EngineSettings(dtype="float32", kv_cache_bytes=GIB, front_end=front_end))
    try:
        assert len(_gpu_children()) == 1, "the engine runs in a child process on the GPU"
        if front_end == "process":  # the front end's own process holds no GPU memory (no CUDA context)
            assert engine.internals.llm.process.pid not in _gpu_children()
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, trainer, ids, sampling, autocast=False)
        stale, after = _stale_then_synced(engine, trainer, ids, sampling, autocast=False)
        # same storages: no new handles, new values read
        _, again = _stale_then_synced(engine, trainer, ids, sampling, autocast=False)
        print(f"process engine (front end in the {front_end}), mean |delta logp| fp32: start {start:.5f}, "
              f"stale {stale:.4f}, after sync {after:.5f}, after a second step and sync {again:.5f}")
        assert start < 0.02 and after < 0.02 and again < 0.02
        assert stale > 0.1 and after < stale / 20
    finally:
        engine.shutdown()
    assert not _gpu_children()  # the engine process ended


@pytest.mark.parametrize("front_end", ["trainer", "process"])
def test_the_engine_process_ends_when_the_trainer_is_killed(front_end):
    """A trainer killed outright (SIGKILL: no teardown) leaves no engine process holding GPU memory."""
    import os
    import subprocess
    import time

    import psutil

    script = textwrap.dedent("""
        import time
        from lightning_rl.models import load_policy
        from lightning_rl.rollout import EngineSettings
        from lightning_rl.rollout.vllm_process import VLLMProcessEngine
        model, tok = load_policy("smollm2-135m-instruct", dtype="bfloat16")
        engine = VLLMProcessEngine(model.cuda(), [tok.eos_token_id], tok.pad_token_id, max_model_len=256,
                                   max_num_seqs=8, settings=EngineSettings(kv_cache_bytes=1 << 28,
                                                                           front_end=FRONT_END))
        print("READY", flush=True)
        time.sleep(600)
    """).replace("FRONT_END", repr(front_end))
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in trainer.stdout:
            if line.startswith("READY"):
                break
        assert trainer.poll() is None, "the trainer script ended before its engine was ready"
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        on_gpu = lambda: {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}  # noqa: E731
        engines = [c.pid for c in psutil.Process(trainer.pid).children(recursive=True) if c.pid in on_gpu()]
        assert len(engines) == 1, "the engine runs in a child process of the trainer, on the GPU"
        trainer.kill()
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(engines) & on_gpu():
            time.sleep(0.5)
        print(f"engine process gone {60 - (deadline - time.monotonic()):.1f} s after the trainer was killed")
        assert not set(engines) & on_gpu(), "the engine process still holds GPU memory after its trainer died"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_engine_process_merges_the_lora_adapter_at_each_sync():
    """A LoRA policy: the engine process adds ``scale * B @ A`` to the base weights it reads, at every sync."""
    from lightning_rl.lora import apply_lora
    from lightning_rl.models import load_policy

    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    torch.manual_seed(0)
    peft = apply_lora(model.cuda(), {"r": 16, "lora_alpha": 32}).train()
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
            torch.nn.init.normal_(p, std=0.02)
    engine = VLLMProcessEngine(peft, _eos(model, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                               settings=EngineSettings(dtype="float32", kv_cache_bytes=GIB))
    try:
        assert engine.lora_mode is None and "enable_lora" not in engine.engine_kwargs  # merged, no LoRA kernels
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, peft, ids, sampling, autocast=False)
        with peft.disable_adapter():
            without_adapter = _mismatch(engine, peft, ids, sampling, autocast=False)
        # AdamW on the adapter only (the base is frozen)
        stale, after = _stale_then_synced(engine, peft, ids, sampling, autocast=False)
        print(f"process engine, LoRA, mean |delta logp| fp32: start {start:.5f}, against the base alone "
              f"{without_adapter:.4f}, stale {stale:.4f}, after sync {after:.5f}")
        assert start < 0.02 and after < 0.02
        assert without_adapter > 5 * start  # the engine generates with the adapter merged in
        assert stale > 0.05 and after < stale / 5
    finally:
        engine.shutdown()
    assert not _gpu_children()


def test_a_lora_base_shared_as_the_engines_merged_weights_matches_the_engine_and_frees_the_trainers_copy():
    """``share_merged_base=True``: the trainer's frozen base is the engine's merged weights; the adapter path adds
    nothing to the value, so the trainer computes what the engine generates with, and its own base copy is gone."""
    from lightning_rl.lora import apply_lora
    from lightning_rl.models import load_policy
    from lightning_rl.rollout.merged_base import StaleMergedBaseError
    from lightning_rl.rollout.shared_weights import frozen_base_parameters

    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    torch.manual_seed(0)
    peft = apply_lora(model.cuda(), {"r": 16, "lora_alpha": 32}).train()
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    pristine = {n: p.detach().cpu().clone() for n, p in frozen_base_parameters(peft).items()}
    base_bytes = sum(t.numel() * t.element_size() for t in pristine.values())
    engine = VLLMProcessEngine(peft, _eos(model, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                               settings=EngineSettings(dtype="float32", kv_cache_bytes=GIB, share_merged_base=True))
    try:
        assert engine.merged_base.bytes_shared == base_bytes
        assert engine.merged_base_freed_bytes > 0.9 * base_bytes  # the trainer's own copy left the device
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, peft, ids, sampling, autocast=False)
        _step(peft, engine, ids, sampling, autocast=False)
        with pytest.raises(StaleMergedBaseError):  # the merged weights hold the adapter before the step
            _mismatch(engine, peft, ids, sampling, autocast=False)
        engine.sync_weights(peft)
        after = _mismatch(engine, peft, ids, sampling, autocast=False)
        state = peft.state_dict()
        print(f"merged shared base: {base_bytes / 2**20:.1f} MiB shared, {engine.merged_base_freed_bytes / 2**20:.1f} "
              f"MiB freed; mean |delta logp| fp32 start {start:.5f}, after a step and a sync {after:.5f}")
        assert start < 0.02 and after < 0.02
        for name, t in pristine.items():  # checkpoints hold the base, not the merged weights
            key = next(k for k in state if k.replace(".base_layer.", ".").endswith(name))
            assert torch.equal(state[key].cpu(), t), name
    finally:
        engine.shutdown()
    for name, p in frozen_base_parameters(peft).items():  # private copies of the base again
        assert p.is_cuda and torch.equal(p.cpu(), pristine[name]), name
    assert not _gpu_children()


def test_a_lora_fit_with_the_base_shared_as_the_engines_merged_weights_overlaps_validates_and_trains():
    """The README's LoRA fit: by default the base is the engine's merged weights, synced before every update and
    before each validation (which generates with the policy), mid-epoch while a rollout is generated ahead."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-4, lora={"r": 16, "lora_alpha": 32})
    shared, validated = [], []

    class Shared(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shared.append(callback.engine.merged_base.bytes_shared)

        def on_validation_end(self, trainer, pl_module):
            validated.append((trainer.global_step, float(trainer.callback_metrics["val/reward"])))

    callback = VLLMRollout()
    from lightning_rl.plugins import MemoryAwarePrecision

    trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Shared()],
                        plugins=[MemoryAwarePrecision()], val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=64, num_val=4, batch_size=8))
    mismatch = float(trainer.callback_metrics["train/logprob_mismatch_mean"])
    print(f"LoRA fit, merged shared base: {shared[0] / 2**20:.1f} MiB shared, syncs {callback.num_syncs}, "
          f"validations {validated}, last mismatch {mismatch:.4f}")
    assert callback.overlapping and callback.sharing_merged_base and trainer.global_step == 4
    # the first update needs no sync (the adapter has not moved since the engine merged it at its start)
    assert all(b > 0 for b in shared) and callback.num_syncs >= 3
    assert [g for g, _ in validated] == [2, 4]
    assert mismatch < 0.15
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)  # it trained
    assert callback.engine is None and not _gpu_children()


def _states_on_gpu(optimizer):
    """(state tensors on the GPU, state tensors) of ``optimizer``, step counters left out."""
    states = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    return sum(t.is_cuda for t in states), len(states)


def _overlapped_fit(module, steps=4, settings=None, extra=(), **callback_args):
    """Fit ``module`` as the README's GPU snippet does (with ``extra`` callbacks after the rollout's); record each
    step's staleness, engine processes and mismatch."""
    from lightning_rl.plugins import MemoryAwarePrecision

    callback = VLLMRollout(settings=settings, **callback_args)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with trainer.precision_plugin.forward_context():  # fp32 weights pack under the update's autocast
                packed = pl_module.packs_sequences(pl_module.policy)
            seen.append({"staleness": callback.last_timings.get("staleness"), "children": len(_gpu_children()),
                         "engine_steps": callback.last_timings.get("engine_steps"),
                         "gpu_yield_waits": callback.last_timings.get("gpu_yield_waits"),
                         "longest": int(batch["rollout"].completion_mask.sum(1).max()),
                         "mismatch": float(trainer.callback_metrics["train/logprob_mismatch_mean"]),
                         "reward": float(trainer.callback_metrics["train/reward_step"]),
                         "expandable": callback.expandable_segments, "segments": len(torch.cuda.memory_snapshot()),
                         "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 3),
                         "states_on_gpu": _states_on_gpu(trainer.optimizers[0]),
                         "engine_memory": (callback.engine.memory_breakdown()
                                           if hasattr(callback.engine, "memory_breakdown") else None),
                         "engine_released_at_start": getattr(callback.engine, "released_at_start_bytes", None),
                         "grads_sent_to_host": len(getattr(trainer.precision_plugin, "host_gradients", None) or ()),
                         "packed": packed,
                         "shared_bytes": getattr(getattr(callback.engine, "shared_weights", None), "bytes_shared", 0),
                         "cpu_share": getattr(trainer.precision_plugin._streamer, "host_share", None),
                         "linear_dtypes": sorted({str(m.weight.dtype) for n, m in pl_module.policy.named_modules()
                                                  if isinstance(m, torch.nn.Linear) and ".layers." in n})})

    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, *extra, Watch()], plugins=[MemoryAwarePrecision()], limit_val_batches=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=64, num_val=4, batch_size=8))
    return trainer, callback, seen


def test_a_lora_fit_overlaps_with_the_adapter_merged_in_the_engine_process():
    """``GRPO(lora=...)`` + ``VLLMRollout()`` + ``MemoryAwarePrecision()``: LoRA overlaps too, with merged weights."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-4, lora={"r": 16, "lora_alpha": 32})
    trainer, callback, seen = _overlapped_fit(module)
    print("overlapped LoRA fit:", seen)
    assert callback.overlapping and callback.sharing_merged_base and trainer.global_step == 4  # the default
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert all(s["children"] == 1 for s in seen)
    assert seen[0]["mismatch"] < 0.05  # peft starts B at zero: the engine's merged weights are the base
    assert all(s["mismatch"] < 0.15 for s in seen[1:])
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)  # it trained
    # beside the engine process the checkpointed inputs wait in host memory; the adapter's AdamW states (about
    # 37 MB) are smaller than one 64 MiB step chunk, so they stay on the device
    assert module.offload_checkpoints and not trainer.precision_plugin.streams_optimizer_states
    assert callback.engine is None and not _gpu_children()


def test_an_update_that_yields_the_gpu_to_the_generating_engine_trains_as_before():
    """``VLLMRollout()`` (``yield_gpu=None``): the update waits for its kernels between layers while the engine
    generates."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module)
    print("yielding fit:", [(s["staleness"], s["gpu_yield_waits"], s["mismatch"], s["reward"]) for s in seen])
    assert callback.overlapping and trainer.global_step == 4 and callback.gpu_yield is None  # removed at the end
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert seen[0]["gpu_yield_waits"] == 0  # no update before the first step
    # each step reports the last update's waits: updates 0-2 ran while the next rollout was generated
    assert sum(s["gpu_yield_waits"] for s in seen[1:]) > 0
    assert all(s["mismatch"] < 0.15 for s in seen)


def test_the_readme_configuration_overlaps_rollouts_with_updates():
    """``GRPO`` + ``VLLMRollout()`` + ``MemoryAwarePrecision()``: the next rollout is generated during the update."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module)
    plan = trainer.precision_plugin.memory_plan
    # in this pytest process CUDA may have started before the callback (the fixtures ask torch.cuda.is_available()):
    # whether MPS then served it says whether the driver connects at cuInit or at the context's creation
    print("MPS:", callback.using_mps, callback.mps_off_reason)
    print("overlapped fit:", seen, f"engine start {callback.engine_start_bytes / 2**30:.2f} GiB, planned "
          f"{planned_engine_bytes(plan) / 2**30:.2f} GiB")
    assert callback.overlapping and trainer.global_step == 4
    assert callback.engine_start_bytes > 0  # the engine process's context, weights and KV cache on the device
    kinds = seen[0]["engine_memory"]
    print("engine process memory (GiB):", {k: round(v / 2**30, 3) for k, v in kinds.items()
                                           if not k.startswith("streams_from_")})
    # vLLM's streams there (its current stream, the CUDA-graph capture's) came from the driver, not from PyTorch's
    # pool of 32 per priority level (70 MiB outside PyTorch's allocator on an H200)
    print("engine process streams:", {k: v for k, v in kinds.items() if k.startswith("streams_from_")})
    assert kinds["streams_from_driver"] >= 1 and kinds["streams_from_pool"] == 0
    # no sleep mode in the engine process: its KV cache (sized for the data's prompts, the default) and its own
    # weights are PyTorch tensors there, and vLLM's sleep-mode pools hold nothing
    assert not any(k.startswith("cumem_") for k in kinds)
    assert kinds["torch_allocated"] >= 0.9 * plan.kv_cache_bytes  # whole blocks of the planned cache
    shape = module.training_shape()
    assert callback.prompt_tokens(shape) < shape.max_prompt_tokens
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert all(s["children"] == 1 for s in seen)  # the engine core; vLLM's front end (the default
    # front_end="process") is a child too, without GPU memory
    # before the updates of steps 1 to 3: the engine's weights are the trainer's (share_trained_weights, the
    # default), so each update first takes the step before's results in, the last one too (2 without sharing:
    # no rollout past the last step)
    assert callback.num_syncs == 3
    # each rollout's engine steps were timed in the front-end process: a step per token of its longest completion
    assert all(s["engine_steps"] is not None and s["engine_steps"] >= s["longest"] for s in seen)
    assert seen[0]["mismatch"] < 0.05  # the same weights: bf16 engine against the trainer's bf16 autocast
    # one step old: the mismatch adds the step's change of the policy (0.025-0.075 seen on an H200), which the
    # truncated importance weights correct; a sync that failed would leave the engine on the first weights
    assert all(s["mismatch"] < 0.15 for s in seen[1:])
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    # beside the engine process the AdamW states (1 GiB) stream from the CPU and the checkpointed inputs wait in
    # host memory (the defaults since 2026-12-03; MemoryAwarePrecision.shrink_beside_engine)
    assert trainer.precision_plugin.streams_optimizer_states and module.offload_checkpoints
    # in CPU memory between steps (seen after each step: Lightning moves the states to the CPU after the fit)
    assert all(s["states_on_gpu"][1] and s["states_on_gpu"][0] == 0 for s in seen)
    # the streamed states carry the linear weights' fp32 masters (master_weights="auto"): bf16 parameters on the
    # device, which the engine process maps; fp32 parameters again after the fit
    assert trainer.precision_plugin.resolved_master_weights == "cpu"
    assert all(s["linear_dtypes"] == ["torch.bfloat16"] for s in seen)
    # their gradients (210 linear weights and the tied embedding) wait in host memory from the backward on
    assert all(s["grads_sent_to_host"] == 211 for s in seen)
    # the defaults since 2026-12-05: those bf16 weights are the engine process's own (share_trained_weights=None),
    # and the optimizer steps a share of them on the CPU, balanced after every step (step_on_host=None: "auto")
    print("shared trained weights:", callback.sharing_trained_weights, [s["shared_bytes"] for s in seen],
          "CPU share of the step:", [s["cpu_share"] for s in seen])
    assert callback.sharing_trained_weights and all(s["shared_bytes"] > 0 for s in seen)
    assert trainer.precision_plugin.step_on_host == "auto" and len({s["cpu_share"] for s in seen}) > 1
    # the update's forwards pack the sequences without padding (pack_sequences=None on CUDA under bf16 autocast)
    assert all(s["packed"] for s in seen)
    # AdamW's fused CUDA kernel steps each streamed chunk (the default on CUDA outside AMP and FSDP since 2026-12-03)
    assert trainer.optimizers[0].defaults["fused"]
    assert all(p.dtype == torch.float32 for p in module.policy.parameters())
    # beside the engine process the trainer's allocator grows its segments; back to fixed ones after the fit, for
    # a later engine in this process that needs vLLM's sleep mode
    assert all(s["expandable"] for s in seen) and not callback.expandable_segments
    assert callback.engine is None and not _gpu_children()
    # the step metrics stayed in host memory (one process: no copy, NaN check or kernel of theirs on the GPU), and
    # Lightning logged them from there
    assert all(m.device.type == "cpu" for m in module.train_metrics.values())
    assert "train/reward_step" in trainer.callback_metrics
    # the engine process's start (vLLM's profiling run, the graphs' capture) left blocks cached that it gave back
    released, cached = seen[0]["engine_released_at_start"], [s["engine_memory"]["torch_reserved"]
                                                             - s["engine_memory"]["torch_allocated"] for s in seen]
    print(f"engine process: released {released / 2**20:.0f} MiB after its start; cached unused after each step "
          f"{[round(c / 2**20) for c in cached]} MiB")
    assert released > 0


def test_masters_too_large_to_move_keep_fp32_weights_and_send_their_gradients_to_host_memory(monkeypatch):
    """The README configuration for a model whose masters stay on the device (over ``HOST_MASTERS_AUTO_MAX_BYTES``,
    like the Qwen2.5-0.5B shape): fp32 parameters, their gradients in host memory from the backward to the step."""
    import lightning_rl.plugins.host_residency as host_residency

    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", 0)
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module, steps=3)
    print("overlapped fit, masters on the device:", seen)
    plugin = trainer.precision_plugin
    assert callback.overlapping and trainer.global_step == 3
    assert plugin.resolved_master_weights == "device" and plugin.streams_optimizer_states
    assert all(s["linear_dtypes"] == ["torch.float32"] for s in seen)
    trainable = sum(1 for p in module.policy.parameters() if p.requires_grad)
    assert all(s["grads_sent_to_host"] == trainable for s in seen)  # every fp32 gradient, norms included
    assert all(s["packed"] for s in seen)  # fp32 weights pack under the update's bf16 autocast
    assert seen[0]["mismatch"] < 0.05 and all(s["mismatch"] < 0.15 for s in seen[1:])  # the syncs carried the steps
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert plugin.host_gradients is None and callback.engine is None and not _gpu_children()


def test_an_engine_process_that_fails_to_start_leaves_states_and_checkpoints_on_the_gpu(monkeypatch):
    """The README configuration when the engine process cannot start: an in-process engine between updates, and the
    plugin takes back what it shrank for an engine beside the update (no generation hides those copies now)."""
    import lightning_rl.rollout.vllm_process as vllm_process

    def no_process(*args, **kwargs):
        raise RuntimeError("Engine core initialization failed (simulated)")

    monkeypatch.setattr(vllm_process, "VLLMProcessEngine", no_process)
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module, steps=2)
    print("failed engine process:", seen)
    assert not callback.overlapping and trainer.global_step == 2
    assert [s["staleness"] for s in seen] == [None, None]  # generated between updates from the current weights:
    assert "wake_s" in callback.last_timings  # the in-process engine woke and slept around each rollout
    assert not trainer.precision_plugin.streams_optimizer_states and not module.offload_checkpoints
    assert trainer.precision_plugin.resolved_master_weights == "device"  # fp32 masters back on the device
    assert all(s["linear_dtypes"] == ["torch.float32"] for s in seen)
    assert all(0 < s["states_on_gpu"][0] == s["states_on_gpu"][1] for s in seen)  # beside their parameters


def test_a_kv_cache_sized_from_the_datas_prompts_starts_a_smaller_engine_that_generates_the_rollouts():
    """``EngineSettings(kv_prompt_tokens="data")``: the KV cache holds the data's prompts, not 512-token ones."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module, steps=2, settings=EngineSettings(kv_prompt_tokens="data"))
    shape = module.training_shape()
    plan = trainer.precision_plugin.memory_plan
    limit = VLLMRollout(settings=EngineSettings(kv_prompt_tokens="limit"))
    limit._trainer = callback._trainer
    print("kv from the data:", seen, f"prompts of {callback.prompt_tokens(shape)} tokens (limit "
          f"{shape.max_prompt_tokens}), KV {plan.kv_cache_bytes / 2**20:.0f} MiB, engine start "
          f"{callback.engine_start_bytes / 2**30:.2f} GiB, planned {planned_engine_bytes(plan) / 2**30:.2f} GiB")
    assert callback.prompt_tokens(shape) < shape.max_prompt_tokens == limit.prompt_tokens(shape)
    assert callback.overlapping and trainer.global_step == 2
    assert [s["staleness"] for s in seen] == [0.0, 1.0]  # both rollouts generated, the second beside the update
    assert seen[0]["mismatch"] < 0.05 and seen[1]["mismatch"] < 0.15
    per_token = callback.kv_bytes_per_token(shape, torch.bfloat16)
    assert plan.kv_cache_bytes < limit.kv_tokens(shape, 8) * per_token  # below the limit's, before headroom
    assert callback.engine is None and not _gpu_children()


def test_the_readme_configuration_overlaps_with_vllms_front_end_in_the_trainer():
    """``EngineSettings(front_end="trainer")``: vLLM's front end in the rollout thread; training is the same."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    trainer, callback, seen = _overlapped_fit(module, settings=EngineSettings(front_end="trainer"))
    print("overlapped fit, front end in the trainer:", seen)
    assert callback.overlapping and trainer.global_step == 4
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert all(s["children"] == 1 for s in seen)  # the engine core is the one child on the GPU
    assert seen[0]["mismatch"] < 0.05 and all(s["mismatch"] < 0.15 for s in seen[1:])
    # the trainer's weights are the engine's (share_trained_weights, the default): each update takes the step
    # before's results in, the last one too, as in the test above (2 was the count without sharing)
    assert callback.sharing_trained_weights and callback.num_syncs == 3
    assert callback.engine is None and not _gpu_children()
