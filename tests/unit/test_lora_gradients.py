"""LoRA's parameter gradients from an identity on a merged layer's output (``lightning_rl.lora_gradients``)."""

import torch

from lightning_rl.lora_gradients import AdapterGradients


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(24, 16, dtype=dtype, generator=g)
    a = torch.randn(4, 16, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(24, 4, dtype=dtype, generator=g, requires_grad=True)
    return x, w, a, b


def test_the_adapters_gradients_are_lora_s_and_the_inputs_come_through_the_merged_weight_only():
    x, w, a, b = _inputs(torch.float64)
    scale, target = 2.0, torch.randn(3, 5, 24, dtype=torch.float64)
    merged = w + scale * b.detach() @ a.detach()
    out = AdapterGradients.apply(x @ merged.t(), x, a, b, scale)
    (out * target).sum().backward()
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    plain = x @ w.t() + scale * (x @ a.t()) @ b.t()  # peft's forward on the unmerged weight
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    (plain * target).sum().backward()
    for g, want in zip(got, (x.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)


def test_under_bf16_autocast_the_gradients_are_computed_in_bf16_and_returned_in_the_weights_dtype():
    x, w, a, b = _inputs(torch.float32, seed=1)
    target = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AdapterGradients.apply(x @ (w + b.detach() @ a.detach()).t(), x, a, b, 1.0)
        (out.float() * target).sum().backward()
    got = (a.grad.clone(), b.grad.clone())
    assert a.grad.dtype == b.grad.dtype == torch.float32
    a.grad = b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = x @ w.t() + (x @ a.t()) @ b.t()
        (plain.float() * target).sum().backward()
    for g, want in zip(got, (a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
