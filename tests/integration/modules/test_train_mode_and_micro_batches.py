"""Through Trainer.fit: the update runs in train mode (gradient checkpointing takes effect) and micro-batches follow
the plan."""

import lightning as L
import pytest
import torch
from helpers import SAY_ROWS, TINY, high_ids, make_trainer, tiny_grpo

from lightning_rl import PPO, MemoryAwarePrecision, PromptDataModule, SamplingConfig
from lightning_rl.models import load_policy, save_policy


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny model saved to a folder, loaded back by users with ``from_pretrained`` (which gives eval mode)."""
    L.seed_everything(0, verbose=False)
    net, tok = load_policy("tiny-llama", TINY)
    return str(save_policy(net, tok, tmp_path_factory.mktemp("tiny") / "model"))


class ForwardModes:
    """Records ``(grad enabled, training)`` for every forward of the first decoder layer's MLP.

    The MLP sits inside the layer, so its hook also fires when gradient checkpointing recomputes the layer.
    """

    def __init__(self, module):
        self.calls = []
        layer = module.policy.get_base_model().model.layers[0] if hasattr(module.policy, "get_base_model") \
            else module.policy.model.layers[0]
        layer.mlp.register_forward_pre_hook(lambda m, args: self.calls.append((torch.is_grad_enabled(), m.training)))


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_policy_loaded_in_eval_mode_trains_in_train_mode(saved_tiny, method):
    if method == "grpo":
        module = tiny_grpo(saved_tiny)
    else:
        module = PPO(reward_funcs=[high_ids], model=saved_tiny, num_generations=2,
                     sampling=SamplingConfig(max_new_tokens=4), learning_rate=3e-3, chat_template=False,
                     max_prompt_length=16, num_iterations=1)
    module.configure_model()
    assert not module.policy.training  # transformers' from_pretrained gives eval mode
    modes = ForwardModes(module)
    make_trainer(max_steps=2).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    grad_modes = {training for grad, training in modes.calls if grad}
    assert grad_modes == {True}  # every forward that builds a graph ran in train mode
    # sampling (transformers generate) ran in eval mode
    assert any(not grad and not training for grad, training in modes.calls)


def test_gradient_checkpointing_recomputes_the_layers_in_the_backward(saved_tiny):
    counts = {}
    for gc in (False, True):
        module = tiny_grpo(saved_tiny, gradient_checkpointing=gc)
        module.configure_model()
        modes = ForwardModes(module)
        make_trainer(max_steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        counts[gc] = sum(grad for grad, _ in modes.calls)
    assert counts[False] >= 1
    assert counts[True] == 2 * counts[False]  # each grad-enabled layer forward runs again in the backward


def test_no_eval_mode_warning_at_the_start_of_training(saved_tiny):
    import warnings

    module = tiny_grpo(saved_tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]


def test_gradient_checkpointing_defaults_to_off_on_a_cpu(saved_tiny):
    module = tiny_grpo(saved_tiny)
    assert module.gradient_checkpointing_setting is None
    make_trainer(max_steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert module.gradient_checkpointing is False


def test_offloaded_checkpoints_stay_off_on_a_cpu_and_need_checkpointing(saved_tiny, caplog):
    with pytest.raises(ValueError, match="offload_checkpoints=True offloads the inputs that gradient checkpointing"):
        tiny_grpo(saved_tiny, gradient_checkpointing=False, offload_checkpoints=True)
    module = tiny_grpo(saved_tiny, gradient_checkpointing=True, offload_checkpoints=True)
    with caplog.at_level("INFO", logger="lightning_rl.modules.policy"):
        make_trainer(max_steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert module.global_step == 1 and module.gradient_checkpointing
    assert module.offload_checkpoints is False and not module.training_shape().offload_checkpoints
    assert "nothing to offload" in caplog.text


def test_automatic_offload_of_checkpoints_switches_on_only_for_a_cuda_update_with_checkpointing(saved_tiny):
    """``offload_checkpoints=None``: the plugin's call beside an engine process offloads on CUDA, nowhere else."""
    module = tiny_grpo(saved_tiny, gradient_checkpointing=True)
    module.configure_model()
    module.gradient_checkpointing = True
    layer = module.policy.model.layers[0]
    eager_func = layer._gradient_checkpointing_func
    assert module.offload_checkpoints_beside_engine() is False  # on a CPU there is nothing to offload
    assert module.offload_checkpoints is False and layer._gradient_checkpointing_func is eager_func
    module._device = torch.device("cuda", 0)  # as on a GPU (only the switch runs here; no forward)
    assert module.offload_checkpoints_beside_engine() is True
    assert module.offload_checkpoints is True
    assert layer._gradient_checkpointing_func is not eager_func  # checkpointing again, now with offloaded inputs
    assert module.offload_checkpoints_beside_engine() is False  # once
    module.keep_checkpoints_on_device()  # the engine generates between updates after all: plain checkpointing again
    assert module.offload_checkpoints is False
    assert layer._gradient_checkpointing_func.func is eager_func.func  # torch's checkpoint, no offloading wrapper
    for kw in ({"offload_checkpoints": False}, {"gradient_checkpointing": False}):  # the user's choice stands
        other = tiny_grpo(saved_tiny, **kw)
        other.configure_model()
        other.gradient_checkpointing = kw.get("gradient_checkpointing", True)
        other._device = torch.device("cuda", 0)
        assert other.offload_checkpoints_beside_engine() is False and other.offload_checkpoints is False


def _count_policy_forwards(module):
    calls = []
    module.configure_model()
    body = module.policy.model
    body.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                   with_kwargs=True)
    return calls


def test_micro_batch_size_none_takes_the_whole_batch_on_a_cpu():
    module = tiny_grpo("tiny-llama", model_config=TINY)
    assert module.micro_batch_size is None
    rows = _count_policy_forwards(module)
    make_trainer(max_steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=4))
    grad_rows = [r for r in rows if r == 8]
    assert grad_rows and max(rows) == 8  # 4 prompts x G=2 in one forward


def test_micro_batches_follow_the_memory_plans_token_budget():
    module = tiny_grpo("tiny-llama", model_config=TINY)
    plugin = MemoryAwarePrecision(memory_budget=4 * 1024**3)
    rows = _count_policy_forwards(module)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        plugins=[plugin])
    # a plan whose token budget holds 3 padded sequences of this rollout
    real = plugin.make_plan

    def small_plan(module_, optimizers, device):
        plan = real(module_, optimizers, device)
        return type(plan)(**{**plan.to_dict(), "micro_batch_tokens": 3 * 12})

    plugin.make_plan = small_plan
    seen = []
    real_micro = module.micro_batch_for
    module.micro_batch_for = lambda n, width: seen.append((n, width)) or real_micro(n, width)
    trainer.fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=4))
    assert module.micro_batch_tokens == 36
    n, width = seen[0]
    fit = max(1, 36 // width)
    assert n == 8 and fit < 8
    k = -(-8 // fit)  # the fewest micro-batches of the update (the last forwards of the step), evened out
    size = -(-8 // k)
    assert rows[-k:] == [size] * (8 // size) + ([8 % size] if 8 % size else [])
