"""Session setup (one intra-op thread, the Triton interpreter without CUDA) and shared fixtures.

Helpers that tests import (rewards, ``make_trainer``, ``MetricRecorder``...) live in ``helpers.py``.
"""

import os

import torch

# Without CUDA the Triton kernels run in the interpreter, which must be switched on before anything
# imports triton (``import lightning`` does): here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
from helpers import TINY, high_ids  # noqa: E402

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
def tiny_llama_loader(saved_tiny_llama):
    """Factory: ``layers`` -> a function loading a fresh copy of that saved tiny-llama (fp32, eval mode)."""
    from lightning_rl import load_policy

    def factory(layers: int = 2):
        path = saved_tiny_llama(layers)
        return lambda: load_policy(path)[0]

    return factory


@pytest.fixture
def make_data(prompt_rows):
    """Factory of PromptDataModules over ``prompt_rows``."""

    def factory(batch_size=2, rows=None, **kwargs):
        from lightning_rl import PromptDataModule

        return PromptDataModule(train_data=rows if rows is not None else prompt_rows, batch_size=batch_size,
                                **kwargs)

    return factory


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo ``torch.distributed`` group of this process alone (what vLLM starts on one GPU), destroyed after."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def vllm_and_cuda_pretended(monkeypatch):
    """vLLM and CUDA reported present, so ``VLLMEngine`` runs its own checks up to the point it would start vLLM."""
    from lightning_rl.rollout import vllm as vllm_mod
    from lightning_rl.rollout import vllm_internals

    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", True)
    monkeypatch.setattr(vllm_mod.torch.cuda, "is_available", lambda: True)


@pytest.fixture
def saved_tiny_llama(tmp_path):
    """Factory: a seeded tiny-llama with ``layers`` decoder layers saved to a folder (loaded back as users do)."""
    from lightning_rl import load_policy

    def factory(layers: int = 2) -> str:
        torch.manual_seed(0)
        net, tok = load_policy("tiny-llama", {"num_hidden_layers": layers})
        path = tmp_path / f"tiny-llama-{layers}"
        net.save_pretrained(path)
        tok.save_pretrained(path)
        return str(path)

    return factory


@pytest.fixture(scope="module")
def qwen():
    """tiny-qwen2 (untied head) with an LM-head bias that makes EOS likely, so rollouts both stop and
    run to the length limit."""
    from lightning_rl import load_policy

    torch.manual_seed(0)
    model, tok = load_policy("tiny-qwen2")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 2.5
    model.lm_head = head
    return model.eval(), tok


@pytest.fixture
def moved_to_host(monkeypatch):
    """The shapes of the layer inputs that offloaded checkpoints send to host memory, in order."""
    from lightning_rl import checkpoint_offload

    moved = []
    to_host = checkpoint_offload.to_host

    def counting(tensor):
        moved.append(tuple(tensor.shape))
        return to_host(tensor)

    monkeypatch.setattr(checkpoint_offload, "to_host", counting)
    return moved
