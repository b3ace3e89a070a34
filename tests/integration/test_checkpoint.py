"""A GRPO checkpoint loads back with identical weights, and training resumes where it stopped."""

import functools

import lightning as L
import pytest
import torch
from helpers import make_trainer, state_copy
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import GRPO, SamplingConfig


def _fit_and_save(make_grpo, make_data, tmp_path, steps=2, **overrides):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=4), **overrides)
    module.configure_model()
    initial = state_copy(module.policy)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=steps, save_top_k=-1)
    trainer = make_trainer(max_steps=steps, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(module, make_data(batch_size=2))
    path = tmp_path / f"step={steps}.ckpt"
    assert path.is_file(), sorted(p.name for p in tmp_path.iterdir())
    trained = module.policy.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training did not move the weights"
    return module, trainer, path


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_load_from_checkpoint_gives_identical_policy(make_grpo, make_data, tmp_path, lora):
    module, _, path = _fit_and_save(make_grpo, make_data, tmp_path, lora=lora)
    trained = state_copy(module.policy)
    L.seed_everything(123, verbose=False)  # a different random init, overwritten by the checkpoint
    loaded = GRPO.load_from_checkpoint(path)
    assert loaded.num_generations == 2 and loaded.sampling.max_new_tokens == 4
    assert loaded.rewards.names == module.rewards.names
    _assert_same(trained, loaded.policy.state_dict())
    if lora:
        assert all("lora_" in n for n, p in loaded.policy.named_parameters() if p.requires_grad)


class _CompareOnStart(L.Callback):
    """At the start of the resumed fit: compare the restored state with the checkpoint's."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.checked = False

    def on_train_start(self, trainer, pl_module):
        assert trainer.global_step == 2
        saved = self.ckpt["optimizer_states"][0]
        restored = trainer.optimizers[0].state_dict()
        assert saved["param_groups"] == restored["param_groups"]
        assert saved["state"].keys() == restored["state"].keys() and len(saved["state"]) > 0
        for i, s in saved["state"].items():
            for name, value in s.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][i][name])), (i, name)
        want = {k[len("policy."):]: v for k, v in self.ckpt["state_dict"].items() if k.startswith("policy.")}
        _assert_same(want, pl_module.policy.state_dict())
        self.checked = True


def test_resume_continues_global_step_with_optimizer_state(make_grpo, make_data, tmp_path):
    _, first, path = _fit_and_save(make_grpo, make_data, tmp_path)
    assert first.global_step == 2
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2

    module = make_grpo(seed=7, num_generations=2, sampling=SamplingConfig(max_new_tokens=4))
    check = _CompareOnStart(ckpt)
    trainer = make_trainer(max_steps=4, callbacks=[check])
    trainer.fit(module, make_data(batch_size=2), ckpt_path=path)
    assert check.checked
    assert trainer.global_step == 4
    # and the two further steps did train from the restored weights
    moved = state_copy(module.policy)
    saved = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    assert any(not torch.equal(saved[k], moved[k]) for k in saved)


def sgd_at_a_hundredth(params):
    """An optimizer given as an importable function (stored as its import path)."""
    return torch.optim.SGD(params, lr=0.01)


@pytest.mark.parametrize("optimizer", [sgd_at_a_hundredth, functools.partial(torch.optim.SGD, lr=0.01)],
                         ids=["import-path", "partial"])
def test_a_loaded_module_fits_again_with_its_optimizer_and_scheduler(make_grpo, make_data, tmp_path, optimizer):
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    _, _, path = _fit_and_save(make_grpo, make_data, tmp_path, optimizer=optimizer, lr_scheduler=scheduler,
                               learning_rate=1e-5)  # the default: the optimizer carries its own
    loaded = GRPO.load_from_checkpoint(path)
    trainer = make_trainer(max_steps=1)
    trainer.fit(loaded, make_data(batch_size=2))
    opt = trainer.optimizers[0]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["initial_lr"] == 0.01
    assert type(trainer.lr_scheduler_configs[0].scheduler) is torch.optim.lr_scheduler.StepLR
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # the scheduler stepped once


def test_a_lambda_reward_is_named_when_the_checkpoint_loads(make_grpo, make_data, tmp_path):
    _, _, path = _fit_and_save(make_grpo, make_data, tmp_path,
                               reward_funcs=[lambda prompts, completions, **kw: [float(len(c)) for c in completions]])
    assert torch.load(path, weights_only=True)["hyper_parameters"]["reward_funcs"] == [None]
    with pytest.raises(TypeError, match=r"reward function #0 is None.*reward_funcs=\[\.\.\.\]"):
        GRPO.load_from_checkpoint(path)
    loaded = GRPO.load_from_checkpoint(path, reward_funcs=[lambda prompts, completions, **kw: [1.0] * len(completions)])
    assert loaded.rewards.names
