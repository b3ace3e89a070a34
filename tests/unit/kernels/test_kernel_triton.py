"""Triton log-prob/entropy kernel vs the float64 reference, on the CPU through ``TRITON_INTERPRET=1``.

On a machine with CUDA (and no ``TRITON_INTERPRET`` set) the same tests run on the GPU instead,
so a combined ``pytest`` run there does not turn the real kernels into interpreted ones.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

pytest.importorskip("triton")

from lightning_rl.kernels.reference import token_logprobs_entropy_reference  # noqa: E402
from lightning_rl.kernels.triton_logprobs import (  # noqa: E402
    is_available,
    token_logprobs_entropy_triton,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs CUDA or interpreter")

NAMES = ("logp", "entropy", "dh", "dW", "dbias")


def _inputs(seed, n, h, v, dtype, bias=True, n_masked=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(dtype)  # logits of std ~ h**0.25: peaky rows
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:n_masked]] = -100
    g_logp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, g_logp, g_ent


def _run(fn, hidden, weight, bias, targets, g_logp, g_ent, device, **kw):
    """Outputs and (dh, dW, dbias) of ``fn`` for the upstream gradients ``g_logp, g_ent``."""
    leaves = [t.detach().to(device).requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().to(device).requires_grad_()
    logp, ent = fn(leaves[0], leaves[1], targets.to(device), bias=b, **kw)
    torch.autograd.backward([logp, ent], [g_logp.to(device, logp.dtype), g_ent.to(device, ent.dtype)])
    grads = [leaves[0].grad, leaves[1].grad, None if b is None else b.grad]
    return [None if t is None else t.detach().double().cpu() for t in (logp, ent, *grads)]


def _check(out, ref, tol):
    for name, a, r in zip(NAMES, out, ref):
        if r is None:
            assert a is None, name
            continue
        scale = r.abs().max().item() + 1e-12
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * scale, msg=lambda m, name=name: f"{name}: {m}")


def _compare(seed, n, h, v, dtype, tol, temperature=1.0, bias=True, n_masked=0):
    hidden, weight, b, targets, gl, ge = _inputs(seed, n, h, v, dtype, bias, n_masked)
    out = _run(token_logprobs_entropy_triton, hidden, weight, b, targets, gl, ge, DEVICE, temperature=temperature)
    # float64 reference on the very same (already rounded) values
    h64, w64, b64 = hidden.double(), weight.double(), None if b is None else b.double()
    ref = _run(token_logprobs_entropy_reference, h64, w64, b64, targets, gl, ge, "cpu", temperature=temperature)
    _check(out, ref, tol)
    return out, targets


@pytest.mark.parametrize(("n", "h", "v"), [(1, 16, 37), (17, 32, 130), (33, 16, 130)])
def test_fp32_matches_reference(n, h, v):
    _compare(seed=n, n=n, h=h, v=v, dtype=torch.float32, tol=1e-4)


def test_fp32_without_bias():
    _compare(seed=3, n=17, h=16, v=37, dtype=torch.float32, tol=1e-4, bias=False)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature):
    _compare(seed=5, n=17, h=32, v=37, dtype=torch.float32, tol=1e-4, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    _compare(seed=7, n=33, h=32, v=130, dtype=dtype, tol=1e-2, temperature=0.8)


def test_masked_tokens_give_zero_and_no_gradient():
    out, targets = _compare(seed=11, n=33, h=16, v=130, dtype=torch.float32, tol=1e-4, n_masked=9)
    masked = targets == -100
    logp, ent, dh = out[0], out[1], out[2]
    assert masked.sum() == 9
    assert torch.all(logp[masked] == 0) and torch.all(ent[masked] == 0)
    assert torch.all(dh[masked] == 0)
    assert torch.all(ent[~masked] > 0)


def test_all_masked_gives_zero_gradients():
    hidden, weight, b, targets, gl, ge = _inputs(13, 17, 16, 37, torch.float32)
    targets[:] = -100
    logp, ent, dh, dw, db = _run(token_logprobs_entropy_triton, hidden, weight, b, targets, gl, ge, DEVICE)
    for t in (logp, ent, dh, dw, db):
        assert torch.all(t == 0)


def _tied_grad(fn, dtype, device, *, seed, n, v, temperature, entropy_weight, mask_every=0, h=16, **kw):
    """dL/dE when one matrix E embeds the inputs and projects to the vocabulary, L = sum(logp) + w * sum(entropy).

    The inputs come from ``seed`` alone, so every call with the same seed sees the same problem.
    """
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(v, h, generator=g)
    mix = torch.randn(h, h, generator=g) / h**0.5
    ids = torch.randint(0, v, (n,), generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    if mask_every:
        targets[::mask_every] = -100
    e = emb.to(device, dtype).clone().requires_grad_()
    hidden = torch.tanh(e[ids.to(device)] @ mix.to(device, dtype))
    logp, ent = fn(hidden, e, targets.to(device), temperature=temperature, **kw)
    (logp.sum() + entropy_weight * ent.sum()).backward()
    return e.grad.double().cpu()


def test_tied_embeddings_accumulate_both_uses():
    """The same matrix embeds the inputs and projects to the vocabulary: dW sums both paths."""
    problem = dict(seed=17, n=17, v=37, temperature=0.9, entropy_weight=0.1)
    got = _tied_grad(token_logprobs_entropy_triton, torch.float32, DEVICE, **problem)
    ref = _tied_grad(token_logprobs_entropy_reference, torch.float64, "cpu", **problem)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_only_entropy_used_and_no_weight_grad():
    hidden, weight, _, targets, _, ge = _inputs(19, 17, 16, 37, torch.float32, bias=False)
    hs = [hidden.clone().to(DEVICE).requires_grad_(), hidden.double().requires_grad_()]
    fns = [token_logprobs_entropy_triton, token_logprobs_entropy_reference]
    ws = [weight.to(DEVICE), weight.double()]
    for hh, fn, w in zip(hs, fns, ws):
        _, ent = fn(hh, w, targets.to(hh.device))
        ent.backward(ge.to(hh.device, ent.dtype))
    ref = hs[1].grad
    torch.testing.assert_close(hs[0].grad.double().cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_is_available_and_argument_checks():
    x = torch.zeros(2, 4, device=DEVICE)
    assert is_available(x)
    with pytest.raises(ValueError):
        token_logprobs_entropy_triton(x, torch.zeros(3, 5, device=DEVICE), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_entropy_triton(x, torch.zeros(3, 4, device=DEVICE), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_entropy_triton(
            x, torch.zeros(3, 4, device=DEVICE), torch.zeros(2, dtype=torch.long), temperature=0.0
        )


# Token row groups x vocabulary chunks in the backward, and the optional tile variants. With these
# overrides the tests below run 3 token groups (16 rows each at H=16) and 5 vocabulary chunks.
GROUPED = {"dh_acc_bytes": 16 * 16 * 4, "dz_chunk_bytes": 16 * 32 * 4}
VARIANTS = {
    "default": {},
    "even_k": {"even_k": 1},
    "tma": {"tma": 1},
    "cublas": {"cublas": 1, "fwd_chunk_bytes": 45 * 64 * 4, "RED_BLOCK_V": 32},
    # persistent dz kernel: the interpreter has 4 "SMs", so each program walks several tiles
    "flatten": {"flatten": 1},
    "flatten_tma": {"flatten": 1, "tma": 1},
}


def _compare_cfg(seed, n, h, v, dtype, tol, config, temperature=1.0, bias=True, n_masked=0, weight_dtype=None):
    hidden, weight, b, targets, gl, ge = _inputs(seed, n, h, v, dtype, bias, n_masked)
    if weight_dtype is not None:
        weight = weight.to(weight_dtype)
    out = _run(
        token_logprobs_entropy_triton, hidden, weight, b, targets, gl, ge, DEVICE, temperature=temperature,
        config=config,
    )  # fmt: skip
    h64, w64, b64 = hidden.double(), weight.double(), None if b is None else b.double()
    ref = _run(token_logprobs_entropy_reference, h64, w64, b64, targets, gl, ge, "cpu", temperature=temperature)
    _check(out, ref, tol)
    return out, targets


def test_group_rows_bounds_the_dh_accumulator():
    from lightning_rl.kernels.triton_logprobs_backward import group_rows

    mib = 1 << 20
    assert group_rows(8192, 1536, 128, 24 * mib) == 4096  # two groups
    assert group_rows(1024, 1536, 128, 24 * mib) == 1024  # one group: v1 behaviour
    rows = group_rows(8192, 4096, 128, 24 * mib)  # cap 1536 -> 6 balanced groups of 1408
    assert rows % 128 == 0 and rows * 4096 * 4 <= 24 * mib and -(-8192 // rows) == 6
    assert group_rows(100, 1 << 20, 16, 1) == 16  # never below BLOCK_N
    assert group_rows(0, 16, 16, 1024) == 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_backward_and_variants(variant, dtype):
    """Odd N, masked tokens, bias and temperature with several token groups and vocabulary chunks."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out, targets = _compare_cfg(
        seed=23, n=45, h=16, v=130, dtype=dtype, tol=tol, config={**GROUPED, **VARIANTS[variant]},
        temperature=0.9, n_masked=7,
    )  # fmt: skip
    masked = targets == -100
    assert torch.all(out[0][masked] == 0) and torch.all(out[2][masked] == 0)


@pytest.mark.parametrize("variant", ["default", "even_k", "flatten"])
def test_grouped_backward_wider_hidden_without_bias(variant):
    """H=48: three K steps; even_k takes its unmasked path (BLOCK_K=16 divides 48)."""
    cfg = {"dh_acc_bytes": 16 * 48 * 4, "dz_chunk_bytes": 16 * 32 * 4, **VARIANTS[variant]}
    _compare_cfg(seed=29, n=37, h=48, v=97, dtype=torch.float32, tol=1e-4, config=cfg, bias=False, n_masked=3)


def test_even_k_falls_back_when_block_k_does_not_divide_h():
    _compare_cfg(seed=31, n=21, h=24, v=70, dtype=torch.float32, tol=1e-4, config={**GROUPED, "even_k": 1})


def test_grouped_fp32_weight_with_bf16_hidden_keeps_fp32_dw():
    out, _ = _compare_cfg(
        seed=37, n=45, h=16, v=130, dtype=torch.bfloat16, tol=2e-2, config=GROUPED, weight_dtype=torch.float32
    )
    assert out[3] is not None


def test_grouped_tied_embeddings():
    problem = dict(seed=41, n=45, v=70, temperature=1.1, entropy_weight=-0.3, mask_every=5)
    ref = _tied_grad(token_logprobs_entropy_reference, torch.float64, "cpu", **problem)
    for variant in ("default", "cublas"):
        got = _tied_grad(token_logprobs_entropy_triton, torch.float32, DEVICE, **problem,
                         config={**GROUPED, **VARIANTS[variant]})
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=variant)


def test_autocast_runs_the_kernel_in_the_autocast_dtype_with_fp32_weight_gradients(monkeypatch):
    """fp32 master weights under bf16 autocast: the kernel gets bf16 inputs (fast), dW stays fp32 and exact."""
    from lightning_rl import logprobs

    seen = []
    real = logprobs._triton_fn()

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, config=GROUPED, **kwargs)

    monkeypatch.setattr(logprobs, "_triton_fn", lambda: spy)
    hidden, weight, _, targets, gl, ge = _inputs(43, 45, 16, 130, torch.float32, bias=False)
    h = hidden.to(DEVICE).requires_grad_()
    w = weight.to(DEVICE).requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logp, ent = logprobs.token_logprobs_entropy(h, w, targets.to(DEVICE), backend="triton")
    torch.autograd.backward([logp, ent], [gl.to(DEVICE, logp.dtype), ge.to(DEVICE, ent.dtype)])
    assert seen == [(torch.bfloat16, torch.float32)]
    assert logp.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # float64 reference on the values the kernel multiplied: bf16-rounded hidden states and weights
    out = [t.detach().double().cpu() for t in (logp, ent, h.grad, w.grad)] + [None]
    ref = _run(token_logprobs_entropy_reference, hidden.bfloat16().double(), weight.bfloat16().double(), None,
               targets, gl, ge, "cpu")
    _check(out, ref, 2e-2)
    without = logprobs.token_logprobs_entropy(h.detach(), w.detach(), targets.to(DEVICE), backend="triton")
    assert seen[-1] == (torch.float32, torch.float32)  # outside autocast nothing is cast
    assert without[0].dtype == torch.float32
