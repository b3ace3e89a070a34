"""End to end on a GPU: a GRPO loss through the Triton kernel equals the dense-logits path, with less memory."""

import pytest
import torch

from lightning_rl.algorithms.losses import clipped_surrogate, token_weights
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.models import load_policy

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Qwen2.5-0.5B-shaped head (V=151,936, H=896), 4 layers to keep it quick
QWEN_HEAD = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def _dense_logprobs(model, p_ids, p_mask, c_ids, c_mask):
    ids = torch.cat([p_ids, c_ids], 1)
    att = torch.cat([p_mask, c_mask], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
    logits = logits[:, p_ids.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, c_ids[..., None]).squeeze(-1) * c_mask


def _grpo_loss_and_grads(model, logp_fn, batch, adv):
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp = logp_fn(model, *batch)
    c_mask = batch[3].float()
    terms = clipped_surrogate(logp, logp.detach(), adv, 0.2)
    loss = (terms.loss * token_weights(c_mask, "dapo")).sum()
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, peak


def test_grpo_step_kernel_matches_dense_and_saves_the_logits_memory():
    torch.manual_seed(0)
    model, _ = load_policy("tiny-qwen2", model_config=QWEN_HEAD, dtype="bfloat16")
    model = model.cuda()
    n, p, c = 16, 32, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    p_ids = torch.randint(0, 151936, (n, p), device="cuda", generator=g)
    c_ids = torch.randint(0, 151936, (n, c), device="cuda", generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[:4, :10] = 0  # left padding
    c_mask = torch.ones_like(c_ids)
    c_mask[8:, 100:] = 0  # shorter completions
    adv = torch.randn(n, device="cuda", generator=g)
    batch = (p_ids, p_mask, c_ids, c_mask)

    def kernel(model, *b):
        return completion_logprobs(model, *b, backend="triton")[0]

    dense_loss, dense_grads, dense_peak = _grpo_loss_and_grads(model, _dense_logprobs, batch, adv)
    kern_loss, kern_grads, kern_peak = _grpo_loss_and_grads(model, kernel, batch, adv)

    assert kern_loss == pytest.approx(dense_loss, abs=2e-2, rel=2e-2)
    rel = [(kern_grads[k] - dense_grads[k]).norm() / dense_grads[k].norm().clamp(min=1e-12) for k in dense_grads]
    assert max(rel) < 5e-2, f"largest relative gradient difference {max(rel):.3g}"
    logits_bytes = int(c_mask.sum()) * 151936 * 2  # bf16 logits of the completion tokens alone
    print(f"peak extra memory: dense {dense_peak / 2**20:.0f} MiB, kernel {kern_peak / 2**20:.0f} MiB, "
          f"bf16 logits {logits_bytes / 2**20:.0f} MiB")
    assert dense_peak - kern_peak >= logits_bytes
