"""A full fine-tune whose bf16 weights are the engine process's own (``share_trained_weights``), on a GPU."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402

from lightning_rl import GRPO, VLLMRollout  # noqa: E402
from lightning_rl.logprobs import completion_logprobs  # noqa: E402
from lightning_rl.models import load_policy  # noqa: E402
from lightning_rl.plugins.host_masters import HostMasterWeights  # noqa: E402
from lightning_rl.plugins.streamed_states import StreamedOptimizerStates  # noqa: E402
from lightning_rl.prompting import encode_prompts  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings, SamplingConfig  # noqa: E402
from lightning_rl.rollout.shared_trained_weights import StaleSharedWeightsError  # noqa: E402
from lightning_rl.rollout.vllm_process import VLLMProcessEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_vllm_engine import PROMPTS, _eos, _mismatch  # noqa: E402
from test_vllm_process import _gpu_children, _overlapped_fit  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GIB = 1 << 30


def test_trained_weights_shared_with_the_engine_process_reach_it_at_each_sync_and_free_the_trainers_copy():
    """SmolLM2 with host masters: its bf16 weights become the engine's, a step leaves the engine's weights alone
    until the sync copies the rounded masters in, and the log-probs of both sides then agree."""
    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    trainer = model.cuda().train()
    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(trainer)
    torch.cuda.empty_cache()
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-4)
    masters.watch_optimizer(opt)
    streamer = StreamedOptimizerStates(split_large=True)
    streamer.masters = masters
    engine = VLLMProcessEngine(trainer, _eos(trainer, tok), tok.pad_token_id, max_model_len=512, max_num_seqs=32,
                               settings=EngineSettings(dtype="bfloat16", kv_cache_bytes=GIB,
                                                       share_trained_weights=True), host_masters=masters)
    try:
        shared = engine.shared_weights
        managed = sum(2 * p.numel() for p in masters.parameters())
        print(f"shared trained weights: {len(shared.views)} weights, {shared.bytes_shared / 2**20:.1f} MiB shared "
              f"of {managed / 2**20:.1f}, trainer freed {engine.shared_weights_freed_bytes / 2**20:.1f} MiB, kept "
              f"private: {shared.skipped}")
        assert shared.bytes_shared == managed and not shared.skipped
        assert engine.shared_weights_freed_bytes > 0.9 * managed  # the trainer's own copy left the device
        for p, view in shared.views.values():
            assert p.data_ptr() == view.data_ptr()
        ids = encode_prompts(tok, PROMPTS[:4])
        sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
        start = _mismatch(engine, trainer, ids, sampling, autocast=True)
        engine_weights = {n: view.clone() for n, (_, view) in shared.views.items()}
        r = engine.generate(ids, sampling, 2, seed=1).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp, _ = completion_logprobs(trainer, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        (-(lp * r.completion_mask).sum() / r.completion_mask.sum()).backward()
        streamer.step(opt)
        for n, (_, view) in shared.views.items():  # the step waits in host memory; the engine's weights as they were
            assert torch.equal(view, engine_weights[n]), n
        with pytest.raises(StaleSharedWeightsError):
            _mismatch(engine, trainer, ids, sampling, autocast=True)
        engine.sync_weights(trainer)
        moved = 0
        for n, (p, view) in shared.views.items():  # the sync copied the rounded masters into the engine's weights
            assert torch.equal(view.cpu(), masters.master(p).to(torch.bfloat16)), n
            moved += int(not torch.equal(view, engine_weights[n]))
        after = _mismatch(engine, trainer, ids, sampling, autocast=True)
        print(f"mean |delta logp| bf16 engine vs trainer on the shared weights: start {start:.5f}, after a step and "
              f"sync {after:.5f}; {moved} of {len(shared.views)} weights moved")
        assert moved == len(shared.views) and start < 0.05 and after < 0.05
    finally:
        engine.shutdown()
    assert not _gpu_children()
    for p in masters.parameters():  # private copies again, with the values of the last step
        assert torch.equal(p.data.cpu(), masters.master(p).to(torch.bfloat16))


def test_the_readme_configuration_with_trained_weights_shared_trains_on_the_engines_weights():
    """``GRPO`` + ``VLLMRollout(settings=EngineSettings(share_trained_weights=True))`` + ``MemoryAwarePrecision()``:
    each update reads the engine's weights, which hold the rounded masters of the step before."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    checked = []

    class Fresh(L.Callback):  # after VLLMRollout's hook: the sync before this update has run
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            masters = trainer.precision_plugin.host_master_weights
            shared = next(c for c in trainer.callbacks if isinstance(c, VLLMRollout)).engine.shared_weights
            exact = all(torch.equal(view.cpu(), masters.master(p).to(torch.bfloat16))
                        for p, view in shared.views.values())
            inside = all(p.data_ptr() == view.data_ptr() for p, view in shared.views.values())
            checked.append((exact, inside, shared.bytes_shared, torch.cuda.memory_allocated()))

    trainer, callback, seen = _overlapped_fit(module, settings=EngineSettings(share_trained_weights=True),
                                              extra=[Fresh()])
    print("overlapped fit, shared trained weights:", [(s["mismatch"], s["reward"]) for s in seen],
          "checks:", checked)
    assert callback.overlapping and callback.sharing_trained_weights and trainer.global_step == 4
    assert all(c[0] and c[1] and c[2] > 0 for c in checked) and len(checked) == 4
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert seen[0]["mismatch"] < 0.05 and all(s["mismatch"] < 0.15 for s in seen[1:])
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in module.policy.parameters())
    assert callback.engine is None and not _gpu_children()
