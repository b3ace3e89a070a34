"""Seeded tiny GRPO / PPO / DPO runs that checkpoint every step, for the exact-resume tests.

Also a script: ``python resume_runs.py KIND DIR KILL_AFTER`` trains and SIGKILLs its own process at
the start of batch ``KILL_AFTER + 1``, after the checkpoint of batch ``KILL_AFTER`` was written
(with ``tests/`` on ``PYTHONPATH``, for ``helpers``).
"""

import os
import signal
import sys

import lightning as L
import torch
from helpers import high_ids
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import DPO, GRPO, PPO, MemoryAwarePrecision, PreferenceDataModule, PromptDataModule, SamplingConfig
from lightning_rl.models import load_policy, save_policy

STEPS = 7  # batches: 3 per epoch, so the runs cross two epoch boundaries
PROMPTS = [{"prompt": f"say {i}"} for i in range(6)]
PAIRS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
         [("abc", "abc", "cba"), ("dab", "abd", "dba"), ("fed", "def", "fed"), ("hgk", "ghk", "khg"),
          ("mlj", "jlm", "mlj"), ("qpn", "npq", "qpn")]]
REWARD = {"GRPO": "train/reward_step", "PPO": "train/reward_step", "DPO": "train/rewards/margins_step",
          "GRPO-LoRA": "train/reward_step", "GRPO-masters": "train/reward_step"}
BASE_DIR = os.environ.get("RESUME_BASE_DIR", "")  # GRPO-LoRA's and GRPO-masters' model (see save_base)


def save_base(path) -> str:
    """A tiny model saved as a directory: a source that gives the same weights on every load."""
    L.seed_everything(0, verbose=False)
    return str(save_policy(*load_policy("tiny-llama", {"num_hidden_layers": 1}), path))


def build(kind: str, seed: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    """A seeded tiny module of ``kind`` and its shuffled data (3 batches an epoch)."""
    L.seed_everything(seed, verbose=False)
    common = dict(model="tiny-llama", model_config={"num_hidden_layers": 1}, learning_rate=3e-3,
                  logprob_backend="reference")
    if kind == "GRPO-LoRA":  # LoRA on a base rebuilt from its directory, frozen weights bf16 under the plugin
        module = GRPO(reward_funcs=[high_ids], num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                      model=BASE_DIR, lora={"r": 4}, beta=0.05, learning_rate=3e-3, logprob_backend="reference")
        return module, PromptDataModule(train_data=PROMPTS, batch_size=2)
    if kind == "GRPO-masters":  # full fine-tune, the linear weights' fp32 masters in host memory under the plugin
        module = GRPO(reward_funcs=[high_ids], num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                      model=BASE_DIR, learning_rate=3e-3, logprob_backend="reference")
        return module, PromptDataModule(train_data=PROMPTS, batch_size=2)
    if kind == "DPO":
        return DPO(beta=0.1, **common), PreferenceDataModule(PAIRS, batch_size=2)
    if kind == "PPO":  # two PPO epochs over two mini-batches: shuffled with the global RNG
        module = PPO(reward_funcs=[high_ids], num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                     num_iterations=2, num_mini_batches=2, value_head_dropout=0.1, **common)
    else:
        module = GRPO(reward_funcs=[high_ids], num_generations=2, sampling=SamplingConfig(max_new_tokens=4), **common)
    return module, PromptDataModule(train_data=PROMPTS, batch_size=2)


PLUGINS = {"GRPO-LoRA": lambda: [MemoryAwarePrecision()],
           "GRPO-masters": lambda: [MemoryAwarePrecision(master_weights="cpu")]}


class StepRecorder(L.Callback):
    """Prompts and reward of every training batch, by the optimizer step it ended at."""

    def __init__(self, reward_key: str):
        self.reward_key = reward_key
        self.steps: dict[int, tuple[list, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        reward = float(trainer.callback_metrics[self.reward_key])
        self.steps[trainer.global_step] = (list(batch["prompt"]), reward)


class Interrupted(RuntimeError):
    """The simulated crash."""


class StopAfter(L.Callback):
    """Ends the run at the start of batch ``batches + 1`` (the checkpoint of batch ``batches`` is on disk)."""

    def __init__(self, batches: int, sigkill: bool = False):
        self.batches, self.sigkill, self.seen = batches, sigkill, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen > self.batches:
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupted(f"stopped after {self.batches} batches")


def fit(kind: str, seed: int, ckpt_dir, stop_after: int | None = None, ckpt_path=None, sigkill: bool = False):
    """Train ``kind`` for :data:`STEPS` batches (or stop after ``stop_after``); returns the module and recorder."""
    module, data = build(kind, seed)
    recorder = StepRecorder(REWARD[kind])
    callbacks = [recorder, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after, sigkill))
    steps_per_batch = getattr(module, "num_iterations", 1) * getattr(module, "num_mini_batches", 1)
    trainer = L.Trainer(max_steps=STEPS * steps_per_batch, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, plugins=PLUGINS.get(kind, lambda: None)())
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except Interrupted:
        pass
    return module, recorder


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, directory, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fit(kind, 0, directory, stop_after=kill_after, sigkill=True)
    sys.exit("the run was not killed")
