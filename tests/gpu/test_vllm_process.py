"""The vLLM engine in its own process (weights read through CUDA IPC) and the overlapped rollout, on a GPU."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402

from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout  # noqa: E402
from lightning_rl.prompting import encode_prompts  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings, SamplingConfig  # noqa: E402
from lightning_rl.rollout.vllm_process import VLLMProcessEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_vllm_engine import PROMPTS, _eos, _mismatch, _step  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GIB = 1 << 30


def _gpu_children():
    """This process's children that hold GPU memory (an engine process; not compile workers or trackers)."""
    import psutil
    import pynvml

    pynvml.nvmlInit()
    on_gpu = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))}
    return [c.pid for c in psutil.Process().children(recursive=True) if c.pid in on_gpu]


def test_engine_process_reads_the_trained_weights_at_each_sync():
    from lightning_rl.models import load_policy

    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    trainer = model.cuda().train()  # fp32 weights and compute: the tightest comparison
    engine = VLLMProcessEngine(trainer, _eos(trainer, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                               settings=EngineSettings(dtype="float32", kv_cache_bytes=GIB))
    try:
        assert len(_gpu_children()) == 1, "the engine runs in a child process on the GPU"
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, trainer, ids, sampling, autocast=False)
        _step(trainer, engine, ids, sampling, autocast=False)
        stale = _mismatch(engine, trainer, ids, sampling, autocast=False)
        engine.sync_weights(trainer)
        after = _mismatch(engine, trainer, ids, sampling, autocast=False)
        _step(trainer, engine, ids, sampling, autocast=False)  # same storages: no new handles, new values read
        engine.sync_weights(trainer)
        again = _mismatch(engine, trainer, ids, sampling, autocast=False)
        print(f"process engine, mean |delta logp| fp32: start {start:.5f}, stale {stale:.4f}, "
              f"after sync {after:.5f}, after a second step and sync {again:.5f}")
        assert start < 0.02 and after < 0.02 and again < 0.02
        assert stale > 0.1 and after < stale / 20
    finally:
        engine.shutdown()
    assert not _gpu_children()  # the engine process ended


def test_the_readme_configuration_overlaps_rollouts_with_updates():
    """``GRPO`` + ``VLLMRollout()`` + ``MemoryAwarePrecision()``: the next rollout is generated during the update."""
    from lightning_rl.plugins import MemoryAwarePrecision

    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    callback = VLLMRollout()
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({"staleness": callback.last_timings["staleness"], "children": len(_gpu_children()),
                         "mismatch": float(trainer.callback_metrics["train/logprob_mismatch_mean"]),
                         "reward": float(trainer.callback_metrics["train/reward_step"])})

    trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Watch()],
                        plugins=[MemoryAwarePrecision()], limit_val_batches=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=64, num_val=4, batch_size=8))
    print("overlapped fit:", seen)
    assert callback.overlapping and trainer.global_step == 4
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert all(s["children"] == 1 for s in seen)
    assert callback.num_syncs == 2  # before the updates of steps 1 and 2 (none for a rollout past the last step)
    assert seen[0]["mismatch"] < 0.05  # the same weights: bf16 engine against the trainer's bf16 autocast
    # one step old: the mismatch adds the step's change of the policy (0.025-0.075 seen on an H200), which the
    # truncated importance weights correct; a sync that failed would leave the engine on the first weights
    assert all(s["mismatch"] < 0.15 for s in seen[1:])
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert callback.engine is None and not _gpu_children()
