"""Sequences packed into one row (a prototype) on a GPU: PyTorch's varlen flash attention against the padded layout."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_rl.logprobs import completion_logprobs, packed_completion_logprobs

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_packing import _batch  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


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
