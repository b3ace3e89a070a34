"""Sequences packed into one row (a prototype) on a GPU: PyTorch's varlen flash attention against the padded layout."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_rl.logprobs import completion_logprobs, packed_completion_logprobs

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_packing import _batch  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_packing_from_host_lengths_never_waits_for_the_device_and_matches_the_masks():
    """The update's packing from the rollout's lengths in host memory: one asynchronous copy from pinned memory, no
    synchronizing call (CUDA's sync debug mode raises on one), the masks' packing index for index."""
    from lightning_rl.packing import pack_lengths, pack_rows

    prompt_ids, prompt_mask, completion_ids, completion_mask = (t.cuda() for t in _batch(n=64, p=40, c=128))
    lengths = prompt_mask.sum(-1).cpu(), completion_mask.sum(-1).cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed = pack_lengths(prompt_ids, completion_ids, *lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    for field in ("input_ids", "position_ids", "cu_seqlens", "targets_at", "completion_rows"):
        assert torch.equal(getattr(packed, field), getattr(expected, field)), field
    assert packed.max_len == expected.max_len and packed.input_ids.is_cuda


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-layers"])
def test_packed_logprobs_and_gradients_match_the_padded_layout_under_bf16_autocast(saved_tiny_llama, compiled):
    from transformers import AutoModelForCausalLM

    from lightning_rl.compiled_layers import compile_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(2), dtype=torch.float32).cuda().train()
    if compiled:
        compile_decoder_layers(model)
    results, peaks = [], []
    for fn in (completion_logprobs, packed_completion_logprobs):
        for seed in range(3):  # other lengths each time: a compiled layer must not recompile for each
            batch = [t.cuda() for t in _batch(n=32, p=24, c=96, vocab=model.config.vocab_size, seed=seed)]
            model.zero_grad()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logp, ent = fn(model, *batch, **({"max_len": 120} if fn is packed_completion_logprobs else {}))
            logp.sum().backward()
            peaks.append(torch.cuda.max_memory_allocated())
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = results
    mask = batch[3].bool()
    assert (logp_b[~mask] == 0).all()
    print(f"mean |delta logp| packed vs padded: {(logp_a - logp_b)[mask].abs().mean():.5f}; peak allocated "
          f"padded {max(peaks[:3]) / 2**20:.1f} MiB, packed {max(peaks[3:]) / 2**20:.1f} MiB")
    assert (logp_a - logp_b)[mask].abs().mean() < 2e-2  # bf16 matmuls; two attention kernels
    for name, g in grads_a.items():
        similarity = torch.nn.functional.cosine_similarity(g.flatten().float(), grads_b[name].flatten().float(), dim=0)
        assert similarity > 0.99, name


@pytest.mark.parametrize("method", ["ppo", "dpo"])
def test_ppo_and_dpo_fits_pack_by_default_on_a_gpu_and_train_as_the_padded_layout(saved_tiny_llama, method):
    import lightning as L
    from helpers import high_ids

    from lightning_rl import DPO, PPO, PreferenceDataModule, PromptDataModule, SamplingConfig

    pairs = [{"prompt": "abc"[: 1 + i % 3], "chosen": "x" * (1 + i % 4), "rejected": "yz" * (1 + i % 2)}
             for i in range(16)]
    prompts = [{"prompt": f"Say {i}"} for i in range(16)]
    losses, moves = [], []
    for pack in (None, False):
        L.seed_everything(0, verbose=False)
        if method == "ppo":
            module = PPO(reward_funcs=[high_ids],
                         model=saved_tiny_llama(2), num_generations=2, num_iterations=1, chat_template=False,
                         sampling=SamplingConfig(max_new_tokens=8), learning_rate=1e-3, max_prompt_length=16,
                         pack_sequences=pack)
            data = PromptDataModule(train_data=prompts, batch_size=4)
        else:
            module = DPO(beta=0.1, model=saved_tiny_llama(2), learning_rate=1e-3, pack_sequences=pack)
            data = PreferenceDataModule(pairs, batch_size=4)
        trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        module.configure_model()
        start = torch.cat([p.detach().flatten().float() for p in module.policy.parameters()])
        trainer.fit(module, datamodule=data)
        with trainer.precision_plugin.forward_context():  # fp32 weights: None packs on CUDA under bf16 autocast
            assert module.packs_sequences(module.policy) is (pack is None)
        losses.append(float(trainer.callback_metrics["train/loss_step"]))
        moves.append(torch.cat([p.detach().flatten().float().cpu() for p in module.policy.parameters()]) - start)
    similarity = torch.nn.functional.cosine_similarity(moves[0], moves[1], dim=0)
    print(f"{method}: last loss packed {losses[0]:.5f}, padded {losses[1]:.5f}; the updates' cosine {similarity:.4f}")
    assert moves[1].abs().max() > 0 and similarity > 0.9  # bf16, two attention kernels: close, not equal
    assert losses[0] == pytest.approx(losses[1], rel=0.05, abs=5e-3)
