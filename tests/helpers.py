"""Shared test helpers: tiny rewards, a quiet CPU Trainer, a metric recorder, and a fake rollout engine.

Imported as ``from helpers import ...``: ``tests/`` is on ``sys.path`` through ``pythonpath`` in
pyproject.toml's pytest options. Fixtures live in ``conftest.py``.
"""

import lightning as L
import torch

# Nothing from lightning_rl at import time: conftest imports this module during the session setup, before
# test modules that set environment variables first (the Triton and vLLM ones) import the library.

TINY = {"num_hidden_layers": 1}


def sevens(prompts, completions, **columns):
    """Fraction of '7' characters in each completion (a behaviour a tiny random model can learn)."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def high_ids(prompts, completions, completion_ids, **columns):
    """Mean token id / 100: a dense reward, so the completions of a group differ and the weights move."""
    return [sum(ids) / (100 * max(len(ids), 1)) for ids in completion_ids]


def char_codes(prompts, completions, **columns):
    """Mean character code / 100 of each completion: a dense reward that reads only the text."""
    return [sum(map(ord, c)) / (100 * max(len(c), 1)) for c in completions]


class MetricRecorder(L.Callback):
    """Keeps the step value of some logged metrics after every training batch."""

    def __init__(self, names=("train/reward_step", "train/kl_step", "train/loss_step")):
        self.names = names
        self.values = {n: [] for n in names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for n in self.names:
            v = trainer.callback_metrics.get(n)
            self.values[n].append(float("nan") if v is None else float(v))


def make_trainer(max_steps=2, callbacks=(), **kwargs):
    """A quiet CPU Trainer."""
    defaults = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **defaults)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
