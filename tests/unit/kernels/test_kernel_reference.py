"""The chunked pure-torch reference: gradcheck in float64, and agreement with plain autograd."""

import pytest
import torch
from lightning_rl.kernels.reference import token_logprobs_entropy_dense, token_logprobs_entropy_reference


def _inputs(seed, n, h, v, n_masked=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) / h**0.25
    bias = torch.randn(v, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:n_masked]] = -100
    return hidden, weight, bias, targets


def test_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(0, n=5, h=4, v=7, n_masked=1)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return token_logprobs_entropy_reference(h, w, targets, bias=b, temperature=0.8, chunk_size=2)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("n", "chunk_size"), [(10, 3), (7, 1024), (9, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_matches_dense(n, chunk_size, temperature):
    hidden, weight, bias, targets = _inputs(n, n=n, h=8, v=37, n_masked=2)
    g = torch.Generator().manual_seed(100 + n)
    g_logp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    results = []
    for fn, kw in (
        (token_logprobs_entropy_reference, {"chunk_size": chunk_size}),
        (token_logprobs_entropy_dense, {}),
    ):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, **kw)
        torch.autograd.backward([logp, ent], [g_logp, g_ent])
        results.append([logp.detach(), ent.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    masked = targets == -100
    assert torch.all(results[0][0][masked] == 0) and torch.all(results[0][2][masked] == 0)


def test_reference_fp32_and_bf16_output_dtype():
    hidden, weight, bias, targets = _inputs(1, n=6, h=8, v=37)
    for dtype in (torch.float32, torch.bfloat16):
        logp, ent = token_logprobs_entropy_reference(hidden.to(dtype), weight.to(dtype), targets, bias=bias.to(dtype))
        assert logp.dtype == ent.dtype == torch.float32


def test_autocast_does_not_round_the_logits():
    torch.manual_seed(0)
    h = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True) * 4  # |logits| ~14: bf16 rounding moves log p by 0.06 on average
    y = torch.randint(0, 50, (7,))
    exact, exact_ent = token_logprobs_entropy_reference(h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ent = token_logprobs_entropy_reference(h, w, y)
        dense, _ = token_logprobs_entropy_dense(h, w, y)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, exact_ent, rtol=0, atol=1e-6)
    torch.testing.assert_close(dense, exact, rtol=1e-5, atol=1e-5)
