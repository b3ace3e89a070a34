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
#: Kernel variants selectable through the config dict; each must match the reference on its own.
VARIANTS = {
    "default": {},  # TMA loads, 128 x 256 tiles
    "pointer_loads": {"tma": 0},
    "v2_tiles": {"tma": 0, "BLOCK_V": 128},  # the default before the third H100 run
    "even_k": {"tma": 0, "even_k": 1},
    "cublas": {"cublas": 1},
    "stages4": {"num_stages": 4},
    "flatten": {"flatten": 1},  # flattened forward loop, persistent dz kernel
}


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


def _compare(seed, n, h, v, dtype, tol_out, tol_grad, config=None, **kw):
    bias = kw.pop("bias", False)
    hidden, weight, b, targets, gl, ge = _inputs(seed, n, h, v, dtype, bias=bias, n_masked=n // 16)
    ref = _run(token_logprobs_entropy_reference, hidden, weight, b, targets, gl, ge, **kw)
    out = _run(token_logprobs_entropy_triton, hidden, weight, b, targets, gl, ge, config=config, **kw)
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qwen_shape_bf16(variant):
    _compare(0, n=4096, h=1536, v=151936, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2, config=VARIANTS[variant])


@pytest.mark.parametrize("variant", ["default", "pointer_loads", "cublas", "flatten"])
def test_qwen_shape_bf16_several_token_groups(variant):
    """``dh_acc_bytes`` of 8 MiB: 4 token groups of 1024 rows, dW accumulated across them in bf16."""
    cfg = {"dh_acc_bytes": 8 << 20, **VARIANTS[variant]}
    _compare(5, n=4096, h=1536, v=151936, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2, config=cfg)


@pytest.mark.parametrize("v", [49152, 128256])
def test_wide_hidden_bf16(v):
    _compare(1, n=1000, h=4096, v=v, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bias_temperature_fp16(variant):
    _compare(
        2, n=777, h=1024, v=32003, dtype=torch.float16, tol_out=1e-4, tol_grad=2e-2, bias=True, temperature=0.7,
        config=VARIANTS[variant],
    )  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_exact_products(variant):
    _compare(
        3, n=300, h=512, v=10007, dtype=torch.float32, tol_out=1e-5, tol_grad=1e-4, bias=True, temperature=1.3,
        config=VARIANTS[variant],
    )  # fmt: skip


def test_odd_hidden_size_variants_fall_back():
    """H=1000: not a multiple of BLOCK_K=64 (even_k falls back); rows of 2000 bytes are 16-byte aligned (TMA
    works). H=1001: rows of 2002 bytes are not, so the default's TMA loads fall back to pointer loads."""
    for variant in ("even_k", "default", "cublas"):
        _compare(6, n=513, h=1000, v=5003, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2, config=VARIANTS[variant])
    _compare(8, n=257, h=1001, v=5003, dtype=torch.bfloat16, tol_out=1e-4, tol_grad=2e-2, config=VARIANTS["default"])


@pytest.mark.parametrize("variant", ["default", "cublas"])
def test_backward_scratch_is_bounded_at_wide_hidden(variant):
    """N=8192, H=4096, V=128256: peak memory beyond inputs and returned gradients stays <= 64 MiB."""
    n, h, v = 8192, 4096, 128256
    hidden, weight, _, targets, g_logp, g_ent = _inputs(7, n, h, v, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, ent = token_logprobs_entropy_triton(hidden, weight, targets, config=VARIANTS[variant])
    grads = torch.autograd.grad([logp, ent], [hidden, weight], [g_logp, g_ent])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in grads)
    assert extra <= 64 * 2**20, f"{variant}: backward scratch {extra / 2**20:.1f} MiB"


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


def test_fp32_master_weights_under_autocast_run_in_bf16_with_fp32_weight_gradients():
    """The trainer's case under bf16-mixed: fp32 hidden states and LM head, the kernel computes in bf16."""
    from lightning_rl.logprobs import token_logprobs_entropy

    n, h, v = 4096, 896, 151936
    hidden, weight, _, targets, gl, ge = _inputs(11, n, h, v, torch.float32, n_masked=n // 16)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, ent = token_logprobs_entropy(leaves[0], leaves[1], targets, backend="triton")
    torch.autograd.backward([logp, ent], [gl, ge])
    assert leaves[1].grad.dtype == torch.float32 and leaves[0].grad.dtype == torch.float32
    # the reference on the values the kernel multiplied (bf16-rounded), computed in fp32
    ref = _run(token_logprobs_entropy_reference, hidden.bfloat16(), weight.bfloat16(), None, targets, gl, ge)
    out = [logp.detach().float(), ent.detach().float(), leaves[0].grad, leaves[1].grad]
    for name, a, r in zip(NAMES, out, ref):
        scale = r.abs().max().item()
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * scale, msg=lambda m, name=name: f"{name}: {m}")


def _compiled_count(kernel) -> int:
    """Compiled variants of a Triton ``@jit`` kernel on the current device."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def test_token_counts_of_any_divisibility_reuse_one_compiled_kernel():
    """Each step's token count differs; a count divisible by 16 (or a new vocabulary split) compiles nothing new.

    The counts are those of a GRPO run on an H200 whose steps with a new divisibility took 1-2 s.
    """
    from lightning_rl.kernels.triton_logprobs_backward import _dz_kernel
    from lightning_rl.kernels.triton_logprobs_forward import _forward_kernel

    h, v = 576, 49152  # SmolLM2-135M's LM head
    counts = (5925, 6369, 6231, 5523, 5504, 6144, 17)  # per-split tiles 3, 1, 24, 64, 3, ...; 5504 and 6144 % 16 == 0
    before = None
    for i, n in enumerate(counts):
        hidden, weight, _, targets, gl, ge = _inputs(20 + i, n, h, v, torch.bfloat16)
        out = _run(token_logprobs_entropy_triton, hidden, weight, None, targets, gl, ge)
        if i == 0:
            before = (_compiled_count(_forward_kernel), _compiled_count(_dz_kernel))
        if n == 5504:  # still correct without the divisibility hint
            ref = _run(token_logprobs_entropy_reference, hidden, weight, None, targets, gl, ge)
            for name, a, r in zip(NAMES, out, ref):
                if r is not None:
                    torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * r.abs().max().item(),
                                               msg=lambda m, name=name: f"{name}: {m}")
    assert (_compiled_count(_forward_kernel), _compiled_count(_dz_kernel)) == before
