"""Bad module settings are refused at construction, naming the fix (GRPO, PPO, DPO, ORPO; optimizers)."""

import functools
import math

import pytest
import torch
from helpers import sevens

from lightning_rl import DPO, GRPO, ORPO, PPO


def zero(prompts, completions, **columns):
    return [0.0] * len(completions)


@pytest.mark.parametrize("cls", [GRPO, PPO, DPO])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": {"top_k": -5}}, r"top_k must be a positive number of tokens, or None \(or 0\).*got -5"),
        ({"weight_decay": -5}, r"weight_decay must be >= 0 .*got -5"),
        ({"weight_decay": math.nan}, r"weight_decay must be >= 0"),
        ({"max_grad_norm": -1}, r"max_grad_norm must be > 0 to clip .*or None \(or 0\) to turn clipping off; got -1"),
        ({"max_unscored_steps": -1}, r"max_unscored_steps must be an integer >= 0, got -1"),
    ],
)
def test_bad_settings_of_every_module_fail_at_construction(cls, kwargs, match):
    args = dict(model="tiny-llama", **kwargs)
    if cls is not DPO:
        args["reward_funcs"] = [zero]
    with pytest.raises(ValueError, match=match):
        cls(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.2, "epsilon_high": 0.1}, r"epsilon_high \(0.1\) is below epsilon \(0.2\).*set it >= epsilon"),
        ({"reward_weights": [math.nan]}, r"reward_weights\[0\] is nan: each weight must be a finite number"),
        ({"reward_weights": [1.0, math.inf], "reward_funcs": [zero, zero]}, r"reward_weights\[1\] is inf"),
    ],
)
def test_bad_grpo_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPO(**{"reward_funcs": [zero], "model": "tiny-llama", **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "ppo"}, r"loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\), got 'ppo'"),
        ({"num_generations": 1}, r"num_generations must be >= 2 \(got 1\).*a group of one has no baseline"),
        ({"sampling": {"temperature": 0.0}}, r"temperature must be > 0 for training rollouts, got 0.0"),
        ({"scale_rewards": "mean"}, r"scale_rewards must be one of \('group', 'batch', 'none'\), got 'mean'"),
        ({"epsilon": 0.0}, r"epsilon must be in \(0, 1\].*got 0.0 and None"),
        ({"epsilon_high": -0.1}, r"epsilon_high a finite number > 0; got 0.2 and -0.1"),
        ({"beta": -1.0}, r"beta must be a finite number >= 0"),
        ({"num_iterations": 0}, r"num_iterations must be a whole number >= 1, got 0"),
        ({"num_mini_batches": 0}, r"num_mini_batches must be a whole number >= 1"),
        ({"micro_batch_size": 0}, r"micro_batch_size must be a whole number >= 1"),
        ({"learning_rate": 0.0}, r"learning_rate must be a positive number"),
        ({"logprob_backend": "cuda"}, r"logprob_backend must be one of"),
        ({"reward_funcs": []}, r"at least one reward function is needed"),
        ({"reward_weights": [1.0, 2.0]}, r"reward_weights has 2 values for 1 reward functions"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    args = dict(reward_funcs=[sevens], model="tiny-llama")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GRPO(**args)


@pytest.mark.parametrize("cls", [GRPO, PPO, DPO])
def test_an_optimizer_with_a_changed_learning_rate_is_refused(cls):
    args = dict(model="tiny-llama", optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    if cls is not DPO:
        args["reward_funcs"] = [zero]
    with pytest.raises(ValueError, match=r"learning_rate and weight_decay apply to the default AdamW optimizer only "
                                         r"\(got learning_rate=0.001\).*set the learning rate and weight decay in the"):
        cls(learning_rate=1e-3, **args)
    with pytest.raises(ValueError, match=r"\(got weight_decay=0.1\)"):
        cls(weight_decay=0.1, **args)
    cls(**args)  # the optimizer alone is fine


def test_ppo_value_learning_rate_is_its_own_group_whatever_the_optimizer():
    ppo = PPO(reward_funcs=[zero], model="tiny-llama", value_learning_rate=0.5,
              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    ppo.configure_model()
    policy, value = ppo.configure_optimizers().param_groups
    assert policy["lr"] == 0.1 and value["lr"] == 0.5  # the policy at the optimizer's own rate
    ppo = PPO(reward_funcs=[zero], model="tiny-llama", learning_rate=3e-4)
    ppo.configure_model()
    assert [g["lr"] for g in ppo.configure_optimizers().param_groups] == [3e-4, 3e-4]


def test_orpo_refuses_a_reference_setting():
    with pytest.raises(ValueError, match="ORPO uses no reference model"):
        ORPO(model="tiny-llama", reference="live")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": float("nan")}, r"beta must be a finite number >= 0"),
        ({"sampling": {"temperature": float("nan")}}, r"temperature must be a finite number >= 0"),
        ({"sampling": {"temperature": float("inf")}}, r"temperature must be a finite number >= 0"),
        ({"sampling": {"max_new_tokens": 4.5}}, r"max_new_tokens must be a whole number of tokens >= 1, got 4.5"),
        ({"num_generations": 2.5}, r"num_generations must be a whole number >= 1, got 2.5"),
        ({"max_prompt_length": 0}, r"max_prompt_length must be an integer >= 1, got 0"),
        ({"logprob_chunk_size": 0}, r"logprob_chunk_size must be an integer >= 1, got 0"),
        ({"epsilon": 1.5}, r"epsilon must be in \(0, 1\]"),
    ],
    ids=["beta-nan", "temperature-nan", "temperature-inf", "max-new-tokens-float", "generations-float",
         "prompt-length-0", "chunk-0", "epsilon-above-1"],
)
def test_nonsense_values_are_refused_when_the_module_is_built(kwargs, match):
    """Before, a NaN beta turned the KL term off without a word, a float token count or group size failed deep in
    the rollout, and a prompt limit of 0 only at the first batch."""
    from lightning_rl import GRPO

    with pytest.raises(ValueError, match=match):
        GRPO(reward_funcs=[len], model="tiny-llama", **kwargs)


def test_numpy_integers_and_an_unclipped_lower_bound_are_accepted():
    """Sweeps pass NumPy integers; epsilon=1 leaves the ratio unclipped from below (used before the checks)."""
    import numpy as np

    module = GRPO(reward_funcs=[len], model="tiny-llama", num_generations=np.int64(4), epsilon=1.0,
                  sampling={"max_new_tokens": np.int64(8)}, max_prompt_length=np.int64(64))
    assert module.num_generations == 4 and module.sampling.max_new_tokens == 8
