"""Reward returns that cannot be used are refused, naming the function; groups without signal are counted."""

import math

import pytest
import torch
from helpers import returns_string

from lightning_rl.rewards import RewardError, RewardSet
from lightning_rl.rewards.validation import zero_std_fraction


def returns_scalar(prompts, completions, **columns):
    return 1.0


def returns_text_values(prompts, completions, **columns):
    return ["1"] * len(completions)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (returns_string, r"'returns_string' returned str '1111' for 4 completions; it must return one float"),
        (returns_scalar, r"'returns_scalar' returned float 1.0 for 4 completions; it must return one float"),
        (returns_text_values, r"'returns_text_values' returned '1' for sample 0; expected a float or None"),
    ],
)
def test_unusable_reward_returns_name_the_function(fn, match):
    with pytest.raises(RewardError, match=match):
        RewardSet([fn])(["p"] * 4, ["c"] * 4, {})


def test_array_and_generator_returns_are_still_rewards():
    total, _ = RewardSet([lambda p, c, **k: torch.tensor([1.0, 2.0]), lambda p, c, **k: (0.5 for _ in c)])(
        ["p"] * 2, ["c"] * 2, {})
    assert total.tolist() == [1.5, 2.5]


def test_zero_std_fraction_counts_groups_without_signal():
    nan = math.nan
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, nan, nan, nan, 2.0, 3.0, 3.0, 3.0, 3.0])
    # groups of 2: [1,1] flat, [0,1] signal, [nan,nan] none, [nan,2] one value, [3,3] flat, [3,3] flat
    assert zero_std_fraction(rewards, 2) == pytest.approx(5 / 6)
    assert zero_std_fraction(rewards, 4) == pytest.approx(2 / 3)  # [1,1,0,1] has signal


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("single", [length_reward, "test_reward_validation.length_reward",
                                    {"class_path": "lightning_rl.rewards.NumericMatch", "init_args": {"column": "a"}}],
                         ids=["function", "import-path", "class-path-spec"])
def test_one_reward_function_alone_counts_as_a_list_of_one(single):
    """``reward_funcs=f`` (not ``[f]``): before, a string was walked one character at a time ("cannot import 'h'")
    and a function raised "'function' object is not iterable"."""
    rewards = RewardSet(single)
    assert len(rewards.funcs) == 1 and callable(rewards.funcs[0])


def test_ppo_takes_one_reward_function_alone_too():
    from lightning_rl import PPO

    assert PPO(reward_funcs=length_reward, model="tiny-llama").rewards.names == ["length_reward"]
    assert len(PPO(reward_funcs="test_reward_validation.length_reward", model="tiny-llama").rewards.funcs) == 1
