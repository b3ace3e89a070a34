"""The update's waits for its own kernels between decoder layers while an engine generates (GPUYield)."""

import pytest
import torch
from torch import nn

from lightning_rl.callbacks.rollout_ahead import RolloutAhead
from lightning_rl.gpu_yield import GPUYield, gpu_yield_for
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy


@pytest.fixture
def policy(saved_tiny_llama):
    net, _ = load_policy(saved_tiny_llama(4), dtype="float32")
    return net.train()


def _ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_waits_after_every_layer_while_active_and_never_when_idle(policy):
    calls, active = [], [True]
    y = GPUYield(policy, lambda: active[0], synchronize=lambda: calls.append(1))
    with torch.no_grad():
        policy(input_ids=_ids())
    assert len(calls) == 4 and y.take_waits() == 4 and y.take_waits() == 0
    policy(input_ids=_ids()).logits.sum().backward()
    assert len(calls) == 12  # after each forward, before each backward
    y.take_waits()
    active[0] = False
    policy(input_ids=_ids()).logits.sum().backward()
    assert len(calls) == 12 and y.take_waits() == 0
    y.remove()
    y.remove()  # idempotent
    active[0] = True
    policy(input_ids=_ids()).logits.sum().backward()
    assert len(calls) == 12


def test_every_second_layer_and_the_backwards_recompute(policy):
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    y = GPUYield(apply_lora(policy, {"r": 2, "target_modules": "all-linear"}), lambda: True, every=2,
                 synchronize=lambda: calls.append(1))
    out = policy(input_ids=_ids()).logits.float().logsumexp(-1).mean()
    assert len(calls) == 2  # layers 1 and 3 of 4
    out.backward()
    # before each of their backwards (and, where transformers checkpoints around the module call, after each
    # recompute as well)
    assert len(calls) in (4, 6)
    assert y.take_waits() == len(calls)


def test_refuses_a_model_without_decoder_layers_and_a_bad_interval(policy):
    with pytest.raises(ValueError, match="no decoder layers"):
        GPUYield(nn.Linear(2, 2), lambda: True)
    with pytest.raises(ValueError, match="every must be >= 1"):
        GPUYield(policy, lambda: True, every=0)


def test_a_rollout_ahead_is_generating_until_its_job_ends():
    import threading

    ahead, release = RolloutAhead(), threading.Event()
    assert not ahead.generating()
    ahead.submit(["p"], 0, lambda: release.wait(10) and "rollout")
    assert ahead.generating()
    release.set()
    ahead.wait()
    assert not ahead.generating() and ahead.take(["p"]) == ("rollout", 0)
    ahead.close()


def test_the_default_yields_where_there_are_decoder_layers_and_an_explicit_true_refuses_a_model_without(policy):
    y = gpu_yield_for(policy, lambda: False, None)
    assert isinstance(y, GPUYield) and len(y.handles) == 4
    y.remove()
    y = gpu_yield_for(policy, lambda: False, True)
    assert len(y.handles) == 4
    y.remove()
    assert gpu_yield_for(nn.Linear(2, 2), lambda: True, None) is None
    with pytest.raises(ValueError, match="no decoder layers"):
        gpu_yield_for(nn.Linear(2, 2), lambda: True, True)
