"""Shared fixtures: seeded tiny GRPO modules, prompt rows, and a CPU Trainer that records metrics."""

import os

import torch

# Without CUDA the Triton kernels run in the interpreter, which must be switched on before anything
# imports triton (``import lightning`` does): here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402

# The tiny models are far too small to gain from intra-op threads, and on a shared 2-core machine the
# spinning threads of a second process slow every matmul down several times (measured: 3 GRPO steps
# 0.9 s with one thread, 6.3 s with two under load).
torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one intra-op thread (and leaves the count as it found it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture
def prompt_rows():
    """Plain-text prompt rows with an extra column."""
    return [{"prompt": f"say {i}", "answer": str(i)} for i in range(32)]


@pytest.fixture
def make_grpo():
    """Factory of seeded tiny GRPO modules (1-layer tiny-llama, short completions)."""
    from lightning_rl import SamplingConfig

    def factory(seed=0, **overrides):
        L.seed_everything(seed, verbose=False)
        kwargs = dict(
            reward_funcs=[high_ids], model="tiny-llama", model_config=TINY, num_generations=4,
            sampling=SamplingConfig(max_new_tokens=6), learning_rate=3e-3, micro_batch_size=8,
            logprob_backend="reference",
        )
        kwargs.update(overrides)
        from lightning_rl import GRPO

        return GRPO(**kwargs)

    return factory


@pytest.fixture
def make_data(prompt_rows):
    """Factory of PromptDataModules over ``prompt_rows``."""

    def factory(batch_size=2, rows=None, **kwargs):
        from lightning_rl import PromptDataModule

        return PromptDataModule(train_data=rows if rows is not None else prompt_rows, batch_size=batch_size,
                                **kwargs)

    return factory


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
