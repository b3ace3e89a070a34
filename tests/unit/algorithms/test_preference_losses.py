"""Preference losses against values computed by hand from the papers' formulas."""

import math

import pytest
import torch

from lightning_rl.algorithms.preference_losses import (
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    kto_weight_advice,
    log_odds,
    orpo_loss,
    sequence_logp,
    sft_nll,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# policy/ref log-probs of two pairs: h = (pc - rc) - (pr - rr) = (-4 + 5) - (-9 + 7) = 3 and (-6 + 5) - (-5 + 6) = -2
PC, PR, RC, RR = torch.tensor([-4.0, -6.0]), torch.tensor([-9.0, -5.0]), torch.tensor([-5.0, -5.0]), \
    torch.tensor([-7.0, -6.0])
H = [3.0, -2.0]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_eq7(beta):
    out = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="sigmoid")
    expected = [-math.log(_sig(beta * h)) for h in H]
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.chosen_rewards, beta * torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out.rejected_rewards, beta * torch.tensor([-2.0, 1.0]))
    torch.testing.assert_close(out.margins, beta * torch.tensor(H))
    assert out.accuracy.tolist() == [1.0, 0.0]


def test_dpo_label_smoothing_cdpo_and_robust():
    beta, eps = 0.5, 0.2
    cdpo = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    robust = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    for i, h in enumerate(H):
        z = beta * h
        assert cdpo.loss[i].item() == pytest.approx(-(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z)), rel=1e-5)
        assert robust.loss[i].item() == pytest.approx(
            (-(1 - eps) * math.log(_sig(z)) + eps * math.log(_sig(-z))) / (1 - 2 * eps), rel=1e-5)
    # with eps = 0 both are plain DPO
    plain = dpo_loss(PC, PR, RC, RR, beta=beta).loss
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust").loss, plain)


def test_dpo_ipo_and_hinge():
    beta = 0.25
    ipo = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo").loss
    hinge = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge").loss
    torch.testing.assert_close(ipo, torch.tensor([(h - 1 / (2 * beta)) ** 2 for h in H]))  # (3-2)^2, (-2-2)^2
    assert ipo.tolist() == pytest.approx([1.0, 16.0])
    torch.testing.assert_close(hinge, torch.tensor([max(0.0, 1 - beta * h) for h in H]))
    assert hinge.tolist() == pytest.approx([0.25, 1.5])


def test_dpo_gradient_direction_and_bad_args():
    pc = PC.clone().requires_grad_()
    pr = PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1).loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0)


def test_length_normalization_and_nll():
    token_logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert sequence_logp(token_logp, mask).tolist() == [-6.0, -4.0]
    assert sequence_logp(token_logp, mask, average=True).tolist() == [-2.0, -4.0]
    assert sft_nll(token_logp, mask).tolist() == [2.0, 4.0]


def test_orpo_matches_paper():
    # length-normalized log-probs: chosen -0.5, rejected -1.5
    chosen_mean, rejected_mean = torch.tensor([-0.5]), torch.tensor([-1.5])
    nll = torch.tensor([0.5])
    lam = 0.2
    out = orpo_loss(chosen_mean, rejected_mean, nll, lam)
    pw, pl = math.exp(-0.5), math.exp(-1.5)
    margin = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    assert out.log_odds_margin.item() == pytest.approx(margin, rel=1e-5)
    assert out.odds_ratio.item() == pytest.approx(-math.log(_sig(margin)), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.5 + lam * -math.log(_sig(margin)), rel=1e-5)
    assert out.accuracy.item() == 1.0
    # log odds stays finite for p -> 1 and matches log(p/(1-p)) elsewhere
    assert torch.isfinite(log_odds(torch.tensor([0.0]))).all()
    assert log_odds(torch.tensor([math.log(0.25)])).item() == pytest.approx(math.log(1 / 3), rel=1e-5)


def test_orpo_uses_length_normalized_logps():
    """Same per-token quality, different lengths: the odds-ratio term sees no preference."""
    token_logp = torch.full((2, 6), -0.7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    mean = sequence_logp(token_logp, mask, average=True)
    out = orpo_loss(mean[:1], mean[1:], sft_nll(token_logp[:1], mask[:1]))
    assert out.log_odds_margin.item() == pytest.approx(0.0, abs=1e-6)
    assert out.odds_ratio.item() == pytest.approx(math.log(2), rel=1e-5)


def test_kto_matches_paper():
    beta, wd, wu = 0.5, 1.0, 1.5
    policy = torch.tensor([-3.0, -8.0, -2.0])
    ref = torch.tensor([-4.0, -6.0, -2.5])
    desirable = torch.tensor([True, False, False])
    z0 = torch.tensor(0.3)
    loss, rewards = kto_loss(policy, ref, desirable, z0, beta, wd, wu)
    r = [1.0, -2.0, 0.5]
    expected = [wd * (1 - _sig(beta * (r[0] - 0.3))), wu * (1 - _sig(beta * (0.3 - r[1]))),
                wu * (1 - _sig(beta * (0.3 - r[2])))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert rewards.tolist() == pytest.approx([beta * x for x in r], rel=1e-5)


def test_kto_kl_reference_point_is_detached_and_clamped():
    policy_kl = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref_kl = torch.tensor([-4.0, -5.5])
    z0 = kto_kl_estimate(policy_kl, ref_kl)
    assert z0.item() == pytest.approx(0.75)  # mean(1.0, 0.5)
    assert not z0.requires_grad
    assert kto_kl_estimate(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0  # max(0, -1)
    # gradients reach the policy log-probs only through r, never through z0
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    ref = torch.tensor([-3.0, -3.0])
    kl = (policy - ref).mean()  # a z0 (= 0 here) that depends on the policy...
    loss, _ = kto_loss(policy, ref, torch.tensor([True, False]), kl, beta=1.0, undesirable_weight=3.0)
    loss.sum().backward()
    # ...is treated as a constant: d/dr of (1 - s(r - z0)) is -s'(0) = -0.25, of 3 (1 - s(z0 - r)) is +0.75;
    # back-propagating through z0 = (r0 + r1) / 2 would give [-0.5, 0.5] instead
    assert policy.grad.tolist() == pytest.approx([-0.25, 0.75])


def test_kto_weight_advice():
    assert kto_weight_advice(10, 10) is None
    assert kto_weight_advice(12, 10) is None  # ratio 1.2 is inside [1, 4/3]
    with pytest.raises(ValueError, match="0 undesirable.*desirable_weight / undesirable_weight"):
        kto_weight_advice(10, 0)
    with pytest.raises(ValueError, match="no desirable"):
        kto_weight_advice(0, 5)
    text = kto_weight_advice(10, 40)
    assert "undesirable_weight=0.25" in text and "recommends 1 to 4/3" in text
    text = kto_weight_advice(40, 10)
    assert "desirable_weight=0.292" in text
