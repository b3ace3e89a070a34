"""group_advantages against hand-computed values, with the edge cases (equal groups, None rewards)."""

import math

import pytest
import torch

from lightning_rl.algorithms.advantages import group_advantages

EPS = 1e-4
# two groups of G=4: one spread, one constant
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
CENTERED_1 = [-1.5, -0.5, 0.5, 1.5]  # group 1 minus its mean 2.5


def test_group_scaling_hand_computed():
    adv = group_advantages(REWARDS, 4, "group")
    std = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)  # unbiased std of group 1 = sqrt(5/3)
    want = [c / (std + EPS) for c in CENTERED_1] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    assert adv.dtype == torch.float32


def test_batch_scaling_hand_computed():
    adv = group_advantages(REWARDS, 4, "batch")
    # std over all 8 rewards: mean 1.25, squared deviations sum to 17.5, unbiased var 17.5/7 = 2.5
    std = math.sqrt(2.5)
    want = [c / (std + EPS) for c in CENTERED_1] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)


def test_no_scaling_is_centered_reward():
    adv = group_advantages(REWARDS, 4, "none")
    torch.testing.assert_close(adv, torch.tensor(CENTERED_1 + [0.0] * 4), rtol=0, atol=0)


def test_groups_are_contiguous_rows():
    # G=2: rows (0,1), (2,3), (4,5) are groups, not strided
    r = torch.tensor([0.0, 1.0, 5.0, 5.0, 3.0, 1.0])
    adv = group_advantages(r, 2, "none")
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, 0.0, 0.0, 1.0, -1.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value", [0.0, -2.5, 0.7, 1e6 + 0.1])
@pytest.mark.parametrize("g", [3, 8])
def test_equal_rewards_in_a_group_give_exactly_zero(scale, value, g):
    # second group varies, so "batch" has a nonzero std; the constant group must still be exactly 0,
    # whatever the float rounding of its mean
    r = torch.cat([torch.full((g,), value), torch.arange(g, dtype=torch.float32)])
    adv = group_advantages(r, g, scale)
    assert torch.isfinite(adv).all()
    assert (adv[:g] == 0).all(), f"constant group of {value} got advantages {adv[:g].tolist()}"
    assert (adv[g:] != 0).any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_everywhere_is_zero_and_finite(scale):
    adv = group_advantages(torch.full((8,), 3.0), 4, scale)
    assert torch.isfinite(adv).all() and (adv == 0).all()


def test_nan_rewards_are_excluded_and_get_zero():
    nan = float("nan")
    r = torch.tensor([1.0, nan, 3.0, 5.0])
    # valid: 1, 3, 5 -> mean 3, centered -2, 0, 2; unbiased std over the 3 valid values = 2
    adv = group_advantages(r, 4, "group")
    torch.testing.assert_close(adv, torch.tensor([-2 / (2 + EPS), 0.0, 0.0, 2 / (2 + EPS)]))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([-2.0, 0.0, 0.0, 2.0]))


def test_nan_rewards_left_out_of_batch_std():
    nan = float("nan")
    r = torch.tensor([1.0, nan, 3.0, nan, 0.0, 4.0])
    adv = group_advantages(r, 3, "batch")
    std = torch.tensor([1.0, 3.0, 0.0, 4.0]).std().item()  # the four valid rewards
    want = torch.tensor([-1.0, 0.0, 1.0, 0.0, -2.0, 2.0]) / (std + EPS)
    torch.testing.assert_close(adv, want)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_nan_group_and_single_valid_reward_give_zero(scale):
    nan = float("nan")
    r = torch.tensor([nan, nan, nan, nan, nan, 2.0, nan, nan, 1.0, 3.0, 1.0, 3.0])
    adv = group_advantages(r, 4, scale)
    assert torch.isfinite(adv).all()
    assert (adv[:8] == 0).all()  # no valid reward / one valid reward: no baseline, no signal
    assert (adv[8:] != 0).all()


def test_bad_scale_rewards_names_the_choices():
    with pytest.raises(ValueError, match=r"scale_rewards must be one of .*'group'.*got 'mean'"):
        group_advantages(REWARDS, 4, "mean")


def test_length_not_a_multiple_of_g():
    with pytest.raises(ValueError, match="multiple of num_generations=3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="flat tensor"):
        group_advantages(REWARDS.view(2, 4), 4)
