"""`lightning-rl export` argument errors: a missing or wrong checkpoint and a wrong ``--module`` say what to pass."""

import pytest
import torch
from helpers import make_trainer, tiny_grpo

from lightning_rl import GRPO
from lightning_rl.export import load_for_export, main
from lightning_rl.modules.policy import MODULE_CLASS_KEY


@pytest.fixture
def grpo_ckpt(saved_tiny_llama, tmp_path):
    """A GRPO checkpoint as ``Trainer.save_checkpoint`` writes it."""
    module = tiny_grpo(saved_tiny_llama(1))
    module.configure_model()
    trainer = make_trainer(max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def export(ckpt, tmp_path, *extra):
    return main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), *extra])


def test_a_missing_checkpoint_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.ckpt\. Pass --ckpt_path the \.ckpt"):
        export(tmp_path / "nope.ckpt", tmp_path)


def test_a_folder_lists_the_checkpoints_in_it(grpo_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is a folder but not a checkpoint ModelParallelStrategy wrote .*"
                                            r"pass the \.ckpt .*; it holds .*run\.ckpt"):
        export(grpo_ckpt.parent, tmp_path)


def test_a_file_that_is_no_checkpoint_is_refused(saved_tiny_llama, tmp_path):
    folder = saved_tiny_llama(1)
    with pytest.raises(ValueError, match="is not a checkpoint torch.load reads"):
        export(f"{folder}/config.json", tmp_path)
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        export(weights, tmp_path)


def test_a_module_class_other_than_the_writer_is_refused(grpo_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--module DPO does not match the checkpoint: it was written by "
                                         r"lightning_rl\.modules\.grpo\.GRPO\. .*--module GRPO"):
        export(grpo_ckpt, tmp_path, "--module", "DPO")


def test_an_older_checkpoint_is_checked_against_its_hyperparameters(grpo_ckpt, tmp_path):
    ckpt = torch.load(grpo_ckpt, weights_only=False)
    del ckpt[MODULE_CLASS_KEY]  # written before checkpoints named their class
    torch.save(ckpt, grpo_ckpt)
    with pytest.raises(ValueError, match=r"--module PPO does not match .*hyperparameters are GRPO's"):
        export(grpo_ckpt, tmp_path, "--module", "PPO")
    assert type(load_for_export(grpo_ckpt)) is GRPO


@pytest.mark.parametrize(("name", "message"), [
    ("GRPo", r"'GRPo' is no module class\. Did you mean GRPO\? Pass one of DPO, GRPO, KTO, ORPO, PPO"),
    ("Nope", r"'Nope' is no module class\. Pass one of DPO, GRPO, KTO, ORPO, PPO"),
    ("PolicyModule", r"'PolicyModule' is no module class"),
    ("my_project.MyModule", r"cannot import the module class 'my_project\.MyModule'"),
    ("lightning_rl.SamplingConfig", r"not a lightning-rl module class"),
])
def test_an_unknown_module_class_lists_the_valid_names(grpo_ckpt, tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        export(grpo_ckpt, tmp_path, "--module", name)


@pytest.mark.parametrize("name", ["GRPO", "lightning_rl.GRPO", "lightning_rl.modules.grpo.GRPO"])
def test_the_writers_class_is_accepted(grpo_ckpt, name):
    assert type(load_for_export(grpo_ckpt, name)) is GRPO
