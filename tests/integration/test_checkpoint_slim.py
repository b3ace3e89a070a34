"""A LoRA checkpoint holds the adapters, not the frozen base, and still loads in a fresh process."""

import subprocess
import sys
import types

import lightning as L
import pytest
import torch
from helpers import make_trainer, state_copy
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import GRPO, PromptDataModule, SamplingConfig
from lightning_rl.models import load_policy, save_policy
from lightning_rl.rewards import LengthPenalty

ROWS = [{"prompt": f"say {i}"} for i in range(4)]


@pytest.fixture
def base_dir(tmp_path):
    """A tiny model saved as a plain transformers directory: a source that gives the same weights each load."""
    L.seed_everything(0, verbose=False)
    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1})
    return save_policy(net, tok, tmp_path / "base")


def train_lora(model, tmp_path, reward_funcs=None):
    L.seed_everything(0, verbose=False)
    module = GRPO(reward_funcs=reward_funcs or [LengthPenalty(target=4)], model=str(model), lora={"r": 4},
                  num_generations=2, sampling=SamplingConfig(max_new_tokens=4), learning_rate=1e-2,
                  logprob_backend="reference")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=2)
    make_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
        module, PromptDataModule(train_data=ROWS, batch_size=2))
    return module, tmp_path / "ckpt" / "last.ckpt"


def test_lora_checkpoint_leaves_the_base_out_and_loads_in_a_fresh_process(base_dir, tmp_path):
    module, path = train_lora(base_dir, tmp_path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    frozen = [k for k, v in module.state_dict(keep_vars=True).items() if not v.requires_grad]
    assert frozen and not set(frozen) & set(saved)  # no base weight in the file
    assert all("lora_" in k for k in saved)
    torch.save(state_copy(module), tmp_path / "trained.pt")
    child = (
        "import sys, torch\n"
        "from lightning_rl import GRPO\n"
        "m = GRPO.load_from_checkpoint(sys.argv[1])\n"
        "want = torch.load(sys.argv[2])\n"
        "got = m.state_dict()\n"
        "assert got.keys() == want.keys(), set(got) ^ set(want)\n"
        "bad = [k for k in want if not torch.equal(got[k], want[k])]\n"
        "assert not bad, bad\n"
        "print('LOADED', len(got))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path), str(tmp_path / "trained.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"LOADED {len(module.state_dict())}" in proc.stdout, proc.stderr[-3000:]


def test_a_changed_base_is_refused_on_load(base_dir, tmp_path):
    _, path = train_lora(base_dir, tmp_path)
    L.seed_everything(1, verbose=False)
    save_policy(*load_policy("tiny-llama", {"num_hidden_layers": 1}), base_dir)  # other weights at the same path
    with pytest.raises(ValueError, match=r"rebuilt from model_source='.*base' differ from the ones this checkpoint "
                                         r"was trained on.*Point the model argument at the original weights"):
        GRPO.load_from_checkpoint(path)


def test_a_changed_source_of_a_full_fine_tunes_reference_is_refused_on_load(base_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    module = GRPO(reward_funcs=[LengthPenalty(target=4)], model=str(base_dir), beta=0.1, num_generations=2,
                  sampling=SamplingConfig(max_new_tokens=4), learning_rate=1e-2, logprob_backend="reference")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=2)
    make_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
        module, PromptDataModule(train_data=ROWS, batch_size=2))
    path = tmp_path / "ckpt" / "last.ckpt"
    GRPO.load_from_checkpoint(path)  # the same source: the reference is rebuilt as it was
    L.seed_everything(1, verbose=False)
    save_policy(*load_policy("tiny-llama", {"num_hidden_layers": 1}), base_dir)  # other weights at the same path
    with pytest.raises(ValueError, match=r"frozen reference model rebuilt from model='.*base' differs from the one "
                                         r"this checkpoint was trained against.*original weights"):
        GRPO.load_from_checkpoint(path)


def test_a_reward_defined_in_main_names_the_fix(base_dir, tmp_path, monkeypatch):
    main = sys.modules["__main__"]

    def script_reward(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    script_reward.__module__, script_reward.__qualname__ = "__main__", "script_reward"
    monkeypatch.setattr(main, "script_reward", script_reward, raising=False)
    _, path = train_lora(base_dir, tmp_path, reward_funcs=[script_reward])
    assert torch.load(path, weights_only=True)["hyper_parameters"]["reward_funcs"] == ["__main__.script_reward"]
    monkeypatch.delattr(main, "script_reward")  # another process: its __main__ has no such function
    with pytest.raises(ImportError, match=r"defined in the script that saved the checkpoint \(__main__\).*"
                                          r"load_from_checkpoint\(path, reward_funcs=\[script_reward"):
        GRPO.load_from_checkpoint(path)
    loaded = GRPO.load_from_checkpoint(path, reward_funcs=[types.FunctionType(script_reward.__code__, {})])
    assert loaded.rewards.names == ["script_reward"]
