"""Triton log-prob/entropy kernel at real LM-head shapes on a GPU, against the chunked fp32 reference."""

import os

import pytest
import torch

pytest.importorskip("triton")

from lightning_rl.kernels.reference import token_logprobs_entropy_reference  # noqa: E402
from lightning_rl.kernels.triton_logprobs import token_logprobs_entropy_triton  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="TRITON_INTERPRET is set"),
]

NAMES = ("logp", "entropy", "dh", "dW", "dbias")


def _inputs(seed, n, h, v, dtype, bias=False, n_masked=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) * (2.0 / h**0.5)).to(dtype)  # logit std ~2
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.randperm(n, device="cuda", generator=g)[:n_masked]] = -100
    g_logp = torch.randn(n, device="cuda", generator=g)
    g_ent = torch.randn(n, device="cuda", generator=g)
    return hidden, weight, b, targets, g_logp, g_ent


def _run(fn, hidden, weight, bias, targets, g_logp, g_ent, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logp, ent = fn(leaves[0], leaves[1], targets, bias=b, **kw)
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    grads = [leaves[0].grad, leaves[1].grad, None if b is None else b.grad]
    out = [logp.detach(), ent.detach(), *grads]
    del leaves, b, logp, ent
    return [None if t is None else t.float() for t in out]


def _compare(seed, n, h, v, dtype, tol_out, tol_grad, **kw):
    bias = kw.pop("bias", False)
    hidden, weight, b, targets, gl, ge = _inputs(seed, n, h, v, dtype, bias=bias, n_masked=n // 16)
    ref = _run(token_logprobs_entropy_reference, hidden, weight, b, targets, gl, ge, **kw)
    out = _run(token_logprobs_entropy_triton, hidden, weight, b, targets, gl, ge, **kw)
    for name, a, r in zip(NAMES, out, ref):
        if r is None:
            assert a is None
            continue
        tol = tol_out if name in ("logp", "entropy") else tol_grad
        torch.testing.assert_close(
            a, r, rtol=tol, atol=tol * r.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )
    masked = targets == -100
    assert torch.all(out[0][masked] == 0) and torch.all(out[2][masked] == 0)


def test_qwen_shape_bf16():
    _compare(0, n=4096, h=1536, v=151936, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


@pytest.mark.parametrize("v", [49152, 128256])
def test_wide_hidden_bf16(v):
    _compare(1, n=1000, h=4096, v=v, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


def test_bias_temperature_fp16():
    _compare(2, n=777, h=1024, v=32003, dtype=torch.float16, tol_out=1e-4, tol_grad=2e-2, bias=True, temperature=0.7)


def test_fp32_exact_products():
    _compare(3, n=300, h=512, v=10007, dtype=torch.float32, tol_out=1e-5, tol_grad=1e-4, bias=True, temperature=1.3)


def test_forward_never_builds_logits():
    n, h, v = 4096, 1536, 151936
    hidden, weight, _, targets, _, _ = _inputs(4, n, h, v, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        token_logprobs_entropy_triton(hidden, weight, targets)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * 2**20, (
        f"forward used {extra / 2**20:.1f} MiB; bf16 logits alone would be {n * v * 2 / 2**20:.0f}"
    )
