"""Clipped surrogate, KL and the token weights of every loss_type against hand-computed numbers."""

import math

import pytest
import torch

from lightning_rl.algorithms.losses import (
    LOSS_TYPES,
    clipped_surrogate,
    kl_k1,
    kl_k3,
    masked_mean,
    token_weights,
)

# three completions of 4, 2 and 1 tokens (7 in all)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
RATIOS = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.25, 1.5])


def _surrogate(ratios, adv, eps=0.2, eps_high=None):
    old = torch.zeros_like(ratios)
    logp = ratios.log().requires_grad_()
    return logp, clipped_surrogate(logp, old, adv, eps, eps_high)


def test_ratio_is_exp_of_logp_difference():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])
    terms = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(terms.ratio, torch.tensor([[math.exp(0.5), math.exp(-1.0)]]))


def test_positive_advantage_clips_high_only():
    logp, terms = _surrogate(RATIOS[None], torch.tensor([1.0]))
    # -min(r, clip(r, 0.8, 1.2)) for A = 1
    torch.testing.assert_close(terms.loss, -torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.2, 1.2]]))
    assert terms.clipped_high.tolist() == [[False, False, False, False, True, True]]
    assert not terms.clipped_low.any()
    terms.loss.sum().backward()
    # d(-r)/dlogp = -r where unclipped; 0 where the clip is active
    torch.testing.assert_close(logp.grad, -torch.tensor([[0.5, 0.9, 1.0, 1.1, 0.0, 0.0]]))


def test_negative_advantage_clips_low_only():
    logp, terms = _surrogate(RATIOS[None], torch.tensor([-2.0]))
    # -min(-2r, -2 clip(r)) = 2 max(r, clip(r))
    torch.testing.assert_close(terms.loss, 2 * torch.tensor([[0.8, 0.9, 1.0, 1.1, 1.25, 1.5]]))
    assert terms.clipped_low.tolist() == [[True, False, False, False, False, False]]
    assert not terms.clipped_high.any()
    terms.loss.sum().backward()
    torch.testing.assert_close(logp.grad, 2 * torch.tensor([[0.0, 0.9, 1.0, 1.1, 1.25, 1.5]]))


def test_epsilon_high_widens_the_upper_range():
    _, terms = _surrogate(RATIOS[None], torch.tensor([1.0]), eps=0.2, eps_high=0.3)
    torch.testing.assert_close(terms.loss, -torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.25, 1.3]]))
    assert terms.clipped_high.tolist() == [[False, False, False, False, False, True]]
    # the lower bound still uses epsilon
    _, neg = _surrogate(RATIOS[None], torch.tensor([-1.0]), eps=0.2, eps_high=0.3)
    torch.testing.assert_close(neg.loss, torch.tensor([[0.8, 0.9, 1.0, 1.1, 1.25, 1.5]]))


def test_per_sequence_and_per_token_advantages_agree():
    logp = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.5, -0.5])
    a = clipped_surrogate(logp, old, adv, 0.2).loss
    b = clipped_surrogate(logp, old, adv[:, None].expand(2, 3), 0.2).loss
    torch.testing.assert_close(a, b)
    # on-policy (ratio 1): loss is -A on every token
    torch.testing.assert_close(clipped_surrogate(old, old, adv, 0.2).loss, -adv[:, None].expand(2, 3))


# ------------------------------------------------------------------------------ token weights


def test_grpo_weights():
    w = token_weights(MASK, "grpo")
    want = torch.tensor([[1 / 12] * 4, [1 / 6, 1 / 6, 0, 0], [1 / 3, 0, 0, 0]])
    torch.testing.assert_close(w, want)


def test_bnpo_weights_per_micro_batch():
    w = token_weights(MASK, "bnpo", micro_batch_size=2)
    # micro-batch rows 0-1 hold 6 tokens, row 2 holds 1; mean over the 2 micro-batches
    want = torch.tensor([[1 / 12] * 4, [1 / 12, 1 / 12, 0, 0], [1 / 2, 0, 0, 0]])
    torch.testing.assert_close(w, want)
    # one micro-batch of everything: token mean over the batch
    torch.testing.assert_close(token_weights(MASK, "bnpo"), MASK / 7)


def test_dr_grpo_weights():
    torch.testing.assert_close(token_weights(MASK, "dr_grpo", max_completion_length=8), MASK / 24)
    torch.testing.assert_close(token_weights(MASK, "dr_grpo"), MASK / 12)  # T = 4 by default


def test_dapo_weights():
    torch.testing.assert_close(token_weights(MASK, "dapo"), MASK / 7)
    # 2 processes, 10 tokens over both: each process's loss is summed then averaged by DDP
    torch.testing.assert_close(token_weights(MASK, "dapo", num_processes=2, global_num_tokens=10), MASK * 2 / 10)


def test_dapo_weights_take_the_global_count_as_a_tensor_without_reading_it_on_the_host(monkeypatch):
    count = torch.tensor(10.0)
    expected = MASK * 2 / 10

    def no_host_read(*args, **kwargs):
        raise AssertionError("token_weights read a tensor on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    monkeypatch.setattr(torch.Tensor, "__float__", no_host_read)
    torch.testing.assert_close(token_weights(MASK, "dapo", num_processes=2, global_num_tokens=count), expected)
    torch.testing.assert_close(token_weights(MASK, "dapo"), MASK / 7)
    torch.testing.assert_close(token_weights(torch.zeros_like(MASK), "dapo"), torch.zeros(MASK.shape))  # no 0/0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weights_aggregate_per_token_loss_as_defined(loss_type):
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 9.0, 9.0], [7.0, 9.0, 9.0, 9.0]])
    loss = (per_token * token_weights(MASK, loss_type, max_completion_length=5, micro_batch_size=2)).sum()
    want = {
        "grpo": (2.5 + 5.5 + 7.0) / 3,  # mean of the per-sequence means
        "bnpo": ((1 + 2 + 3 + 4 + 5 + 6) / 6 + 7.0) / 2,
        "dr_grpo": 28.0 / (3 * 5),
        "dapo": 28.0 / 7,
    }[loss_type]
    assert loss.item() == pytest.approx(want)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_completion_gets_zero_weight_and_no_nan(loss_type):
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    w = token_weights(mask, loss_type, micro_batch_size=1)
    assert torch.isfinite(w).all()
    assert (w[1] == 0).all()
    assert (w[mask == 0] == 0).all() and (w[mask == 1] > 0).all()


def test_empty_completion_hand_computed():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    # grpo still averages over the 3 sequences (the empty one contributes 0)
    want = torch.tensor([[1 / 6, 1 / 6, 0, 0], [0, 0, 0, 0], [1 / 9, 1 / 9, 1 / 9, 0]])
    torch.testing.assert_close(token_weights(mask, "grpo"), want)
    # bnpo with micro-batches of 1: the empty micro-batch counts as one of three
    want = torch.tensor([[1 / 6, 1 / 6, 0, 0], [0, 0, 0, 0], [1 / 9, 1 / 9, 1 / 9, 0]])
    torch.testing.assert_close(token_weights(mask, "bnpo", micro_batch_size=1), want)
    torch.testing.assert_close(token_weights(mask, "dapo"), mask / 5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_out_gives_zero_loss_and_zero_grad(loss_type):
    # every completion truncated and masked (mask_truncated_completions): nothing to learn from
    mask = torch.zeros(3, 4)
    w = token_weights(mask, loss_type, micro_batch_size=2)
    assert torch.isfinite(w).all() and (w == 0).all()
    logp = torch.randn(3, 4).requires_grad_()
    loss = (clipped_surrogate(logp, logp.detach(), torch.ones(3), 0.2).loss * w).sum()
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logp.grad).all() and (logp.grad == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_truncated_full_mask(loss_type):
    # completions that never hit EOS keep every token in the mask
    mask = torch.ones(3, 4)
    w = token_weights(mask, loss_type, max_completion_length=4, micro_batch_size=3)
    torch.testing.assert_close(w, torch.full((3, 4), 1 / 12))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_losses_sum_to_the_full_batch_loss(loss_type):
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    mask[4] = 0  # one empty completion
    logp = (torch.randn(6, 5, generator=g) * 0.2).requires_grad_()
    old = torch.randn(6, 5, generator=g) * 0.2
    adv = torch.randn(6, generator=g)
    w = token_weights(mask, loss_type, max_completion_length=5, micro_batch_size=2)

    full = (clipped_surrogate(logp, old, adv, 0.2).loss * w).sum()
    (full_grad,) = torch.autograd.grad(full, logp)

    total, grad = 0.0, torch.zeros_like(logp)
    for s in range(0, 6, 2):  # the module's loop: slices of weights computed once for the batch
        mb = slice(s, s + 2)
        part = (clipped_surrogate(logp[mb], old[mb], adv[mb], 0.2).loss * w[mb]).sum()
        total += part.item()
        grad += torch.autograd.grad(part, logp)[0]
    assert total == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(grad, full_grad)


def test_micro_batching_does_not_change_grpo_dr_grpo_dapo_weights():
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        torch.testing.assert_close(
            token_weights(MASK, loss_type, micro_batch_size=1), token_weights(MASK, loss_type, micro_batch_size=3)
        )


def test_dapo_split_over_processes_equals_global_token_mean():
    # two processes each hold half of the batch; DDP averages their gradients (sum / 2)
    per_token = torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    halves = [slice(0, 1), slice(1, 3)]
    total_tokens = float(mask.sum())
    per_process = [
        (per_token[h] * token_weights(mask[h], "dapo", num_processes=2, global_num_tokens=total_tokens)).sum()
        for h in halves
    ]
    global_mean = (per_token * mask).sum() / mask.sum()
    assert (sum(per_process) / 2).item() == pytest.approx(global_mean.item())


def test_unknown_loss_type():
    with pytest.raises(ValueError, match=r"loss_type must be one of .*'dapo'.*got 'ppo'"):
        token_weights(MASK, "ppo")


# ------------------------------------------------------------------------------ KL and helpers


def test_kl_k3_hand_computed_and_nonnegative():
    logp = torch.tensor([0.0, math.log(0.5), -3.0])
    ref = torch.tensor([math.log(0.5), 0.0, -3.0])
    # exp(d) - d - 1 with d = ref - logp
    want = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    torch.testing.assert_close(kl_k3(logp, ref), want)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_k3(a, b) >= 0).all()
    assert (kl_k3(a, a) == 0).all()


def test_kl_k3_gradient_vanishes_at_equality():
    logp = torch.randn(5).requires_grad_()
    kl_k3(logp, logp.detach()).sum().backward()
    assert (logp.grad.abs() < 1e-7).all()


def test_kl_k1():
    torch.testing.assert_close(kl_k1(torch.tensor([-1.0]), torch.tensor([-3.0])), torch.tensor([2.0]))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    assert masked_mean(x, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0
