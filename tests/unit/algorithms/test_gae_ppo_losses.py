"""GAE, whitening, PPO losses and KL control, against hand-computed values."""

import math

import pytest
import torch

from lightning_rl.algorithms.gae import explained_variance, gae, whiten
from lightning_rl.algorithms.losses import clipped_surrogate, masked_mean
from lightning_rl.algorithms.ppo_losses import AdaptiveKLController, clipped_value_loss, kl_penalty, token_rewards

# Two sequences: row 0 fills the whole width (truncated at the limit), row 1 ends after 2 tokens.
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.5, 9.0]])  # 9.0 sits on padding and must be ignored
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


# ----------------------------------------------------------------------------- GAE
def test_gae_matches_hand_computation_with_padding_and_truncation():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    # row 0: deltas 0.9*0.2-0.5=-0.32, 0.9*0.4-0.2=0.16, 1-0.4=0.6 ; A = delta + 0.72 * A_next
    # row 1: deltas 0.9*0.5-1.0=-0.55, 2-0.5=1.5 (terminal at the last real token), padding 0
    want_adv = torch.tensor([[-0.32 + 0.72 * (0.16 + 0.72 * 0.6), 0.16 + 0.72 * 0.6, 0.6],
                             [-0.55 + 0.72 * 1.5, 1.5, 0.0]])
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_limits_are_monte_carlo_and_td():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))  # reward-to-go
    torch.testing.assert_close(adv, ret - VALUES * MASK)
    adv0, _ = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)  # one-step TD errors
    torch.testing.assert_close(adv0, torch.tensor([[-0.3, 0.2, 0.6], [-0.5, 1.5, 0.0]]))


def test_gae_empty_row_and_bad_input():
    adv, ret = gae(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert adv.abs().sum() == 0 and ret.abs().sum() == 0
    for name, kwargs in (("gamma", {"gamma": 1.5}), ("gamma", {"gamma": -0.1}), ("lam", {"lam": 1.01}),
                         ("lam", {"lam": float("nan")})):
        with pytest.raises(ValueError, match=f"{name} must be a number in \\[0, 1\\]"):
            gae(REWARDS, VALUES, MASK, **kwargs)
    with pytest.raises(ValueError, match="not right-padded"):
        gae(REWARDS, VALUES, torch.tensor([[1, 0, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        gae(REWARDS, VALUES[:, :2], MASK)


def test_ppo_refuses_gamma_or_lambda_outside_unit_interval():
    from lightning_rl import PPO

    with pytest.raises(ValueError, match="gamma must be a number in"):
        PPO(reward_funcs=[lambda p, c, **k: [0.0] * len(c)], model="tiny-llama", gamma=1.2)
    with pytest.raises(ValueError, match="lam must be a number in"):
        PPO(reward_funcs=[lambda p, c, **k: [0.0] * len(c)], model="tiny-llama", lam=-0.5)


def test_whiten_and_explained_variance():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]),
                               atol=1e-6, rtol=0)
    one = whiten(torch.tensor([[5.0, 1.0]]), torch.tensor([[1, 0]]))  # one value: centered, not blown up
    torch.testing.assert_close(one, torch.zeros(1, 2))
    assert explained_variance(x, x, m) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(x), x, m) == pytest.approx(0.0)
    assert math.isnan(explained_variance(x, torch.ones_like(x), m))


# ----------------------------------------------------------------------------- losses
def test_clipped_policy_loss_per_token_advantages():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    terms = clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, 0.2)
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.2, -0.5, 2.0, 0.8]]))
    assert terms.clipped_high.tolist() == [[True, False, False, False]]
    assert terms.clipped_low.tolist() == [[False, False, False, True]]
    mask = torch.tensor([[1, 1, 0, 1]])  # the masked token's loss of 2.0 must not count
    assert masked_mean(terms.loss, mask).item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    terms = clipped_value_loss(values, old, returns, cliprange_value=0.2)
    # t0: max((1-2)^2, (0.7-2)^2)=1.69 ; t1: max(0, (0.3-0)^2)=0.09 ; t2: unchanged value, 0.25
    torch.testing.assert_close(terms.loss, torch.tensor([[0.845, 0.045, 0.125]]), rtol=1e-6, atol=1e-6)
    assert terms.clipped.tolist() == [[True, True, False]]
    loss = masked_mean(terms.loss, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(0.445)
    loss.backward()  # the clipped branch carries no gradient to the values
    torch.testing.assert_close(values.grad, torch.zeros(1, 3))
    plain = clipped_value_loss(values, old, returns, cliprange_value=None)
    torch.testing.assert_close(plain.loss, torch.tensor([[0.5, 0.0, 0.125]]))


def test_kl_penalty_and_token_rewards():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k2")
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    r = token_rewards(torch.tensor([1.0, 2.0, 5.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]]))


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * 1.002)  # error clipped to +0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 0.998)  # error clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(6.6, 50) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    fixed = AdaptiveKLController(0.3)
    assert fixed.update(100.0, 1000) == 0.3 and not fixed.adaptive
    restored = AdaptiveKLController(0.1, target=6.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="cannot start at 0"):
        AdaptiveKLController(0.0, target=1.0)


def test_whiten_with_a_reduce_uses_the_statistics_of_every_process():
    """Two simulated ranks: each whitens its half with the other's sums added in, as an all-reduce does."""
    torch.manual_seed(0)
    x = torch.randn(6, 9) * 3 + 1
    mask = (torch.rand(6, 9) > 0.3).float()
    whole = whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # unequal shares, as uneven batches give

    def sums(xs, ms):
        m, xd = ms.double(), xs.double()
        return torch.stack([m.sum(), (xd * m).sum(), (xd * xd * m).sum()])

    for i, (xs, ms) in enumerate(halves):
        other = sums(*halves[1 - i])
        got = whiten(xs, ms, reduce=lambda t, other=other: t + other)
        rows = slice(0, 2) if i == 0 else slice(2, 6)
        torch.testing.assert_close(got, whole[rows], atol=1e-5, rtol=1e-5)
    alone = whiten(x[:2], mask[:2])  # without the reduce a rank whitens with its own statistics only
    assert not torch.allclose(alone, whole[:2], atol=1e-3)
