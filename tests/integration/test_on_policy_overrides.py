"""GRPO and PPO train through the OnPolicyModule steps a subclass overrides: compute_advantages and policy_loss."""

import lightning as L
import pytest
import torch
from helpers import TINY, high_ids, make_trainer, state_copy

from lightning_rl import GRPO, PPO, SamplingConfig


def zeroed(cls, hook):
    """A subclass of ``cls`` whose ``hook`` (compute_advantages or policy_loss) returns zeros of its usual shape."""

    def zero(self, *args):
        return 0.0 * getattr(cls, hook)(self, *args)

    return type(f"Zero{hook}{cls.__name__}", (cls,), {hook: zero})


def _module(cls):
    L.seed_everything(0, verbose=False)
    common = dict(reward_funcs=[high_ids], model="tiny-llama", model_config=TINY, num_generations=2,
                  sampling=SamplingConfig(max_new_tokens=4), learning_rate=1e-2, logprob_backend="reference",
                  chat_template=False)
    if issubclass(cls, PPO):
        return cls(num_iterations=1, kl_coef=0.0, **common)
    return cls(**common)


def _policy_change(cls, make_data):
    """How much one training step moved the policy's weights, and the module."""
    module = _module(cls)
    module.configure_model()
    before = state_copy(module.policy)
    make_trainer(max_steps=1).fit(module, make_data(batch_size=2))
    after = module.policy.state_dict()
    return sum((after[k] - before[k]).abs().sum().item() for k in before), module


@pytest.mark.parametrize("base", [GRPO, PPO], ids=["grpo", "ppo"])
def test_the_step_goes_through_compute_advantages_and_policy_loss(base, make_data):
    moved, _ = _policy_change(base, make_data)
    assert moved > 0
    # zero advantages: the surrogate has no gradient (PPO's value head starts at zero, so its loss reaches only the
    # head), the policy stays where it was; the step still ran and logged its advantages as zeros
    still, module = _policy_change(zeroed(base, "compute_advantages"), make_data)
    assert still == 0.0
    assert torch.count_nonzero(module.last_samples.columns["advantage"]) == 0
    # a zero per-token loss: nothing moves at all, value head included
    still, module = _policy_change(zeroed(base, "policy_loss"), make_data)
    assert still == 0.0
    if base is PPO:
        assert torch.count_nonzero(module.value_head.summary.weight) == 0
