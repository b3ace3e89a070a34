"""The norm of all gradients together (one fused norm per dtype), against a float64 reference."""

import math

import torch

from lightning_rl.modules.sharding import gradient_norm
from lightning_rl.tensor_norms import sum_of_squares


def _reference(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_the_norm_of_mixed_dtype_gradients_matches_float64():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 8, generator=gen) * 3, torch.randn(5, generator=gen).bfloat16(),
             torch.randn(0), torch.randn(33, 7, generator=gen).half(), torch.randn(2, 2, generator=gen) * 1e-3]
    grads += [torch.randn(4, 64, generator=gen) for _ in range(300)]  # a LoRA policy's many small tensors
    norm = gradient_norm(grads, torch.device("cpu"))
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert math.isclose(float(norm), _reference(grads), rel_tol=1e-5)
    held = torch.tensor(2.5)  # squared norms of gradients kept in host memory
    assert math.isclose(float(gradient_norm(grads, torch.device("cpu"), held)), math.sqrt(_reference(grads) ** 2 + 2.5),
                        rel_tol=1e-5)


def test_bf16_gradients_are_accumulated_in_fp32():
    grads = [torch.ones(1000, dtype=torch.bfloat16) for _ in range(3)]  # a bf16 norm: 31.625, not sqrt(1000)
    assert math.isclose(float(sum_of_squares(grads)), 3000.0, rel_tol=1e-6)  # bf16 norms: 3000.42


def test_a_nan_or_inf_gradient_makes_the_norm_non_finite():
    for bad in (float("nan"), float("inf")):
        grads = [torch.ones(3), torch.tensor([1.0, bad]).bfloat16()]
        assert not math.isfinite(float(gradient_norm(grads, torch.device("cpu"))))
