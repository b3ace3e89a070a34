"""Shared test helpers: tiny rewards, a quiet CPU Trainer, a metric recorder, and a fake rollout engine.

Imported as ``from helpers import ...``: ``tests/`` is on ``sys.path`` through ``pythonpath`` in
pyproject.toml's pytest options. Fixtures live in ``conftest.py``.
"""

import lightning as L
import torch

# Nothing from lightning_rl at import time: conftest imports this module during the session setup, before
# test modules that set environment variables first (the Triton and vLLM ones) import the library.

TINY = {"num_hidden_layers": 1}
SAY_ROWS = [{"prompt": f"say {i}"} for i in range(16)]


def sevens(prompts, completions, **columns):
    """Fraction of '7' characters in each completion (a behaviour a tiny random model can learn)."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def high_ids(prompts, completions, completion_ids, **columns):
    """Mean token id / 100: a dense reward, so the completions of a group differ and the weights move."""
    return [sum(ids) / (100 * max(len(ids), 1)) for ids in completion_ids]


def char_codes(prompts, completions, **columns):
    """Mean character code / 100 of each completion: a dense reward that reads only the text."""
    return [sum(map(ord, c)) / (100 * max(len(c), 1)) for c in completions]


def returns_string(prompts, completions, **columns):
    """A broken reward function: one string instead of a value per completion."""
    return "1111"


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


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def host_master_stepping(net: torch.nn.Module, lr: float, chunk_bytes: int, split_large: bool = False):
    """``net``'s weights in bf16 with fp32 masters in host memory, its AdamW (weight decay 0.1, watched by the
    masters) and a streamer stepping them ``chunk_bytes`` of states at a time: ``(masters, optimizer, streamer)``."""
    from lightning_rl.plugins.host_masters import HostMasterWeights
    from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(net)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    masters.watch_optimizer(opt)
    streamer = StreamedOptimizerStates(chunk_bytes=chunk_bytes, split_large=split_large)
    streamer.masters = masters
    return masters, opt, streamer


def small_lm(seed: int = 0) -> torch.nn.Sequential:
    """An embedding, two linear layers and a 300-token head (CPU), seeded: a host-masters test model."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(300, 8), torch.nn.Linear(8, 24), torch.nn.GELU(),
                               torch.nn.Linear(24, 300))


def small_lm_backward(model: torch.nn.Module, step: int, part: int = 0) -> None:
    """A bf16-autocast language-model loss of :func:`small_lm` on 3 rows of 7 ids (seeded) and its backward."""
    x = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(100 * step + part))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().log_softmax(-1).mean().neg().backward()


def tied_embedding_model(vocab: int, hidden: int, mid: torch.nn.Module) -> torch.nn.ModuleDict:
    """An embedding tied to the output head around ``mid``, on CUDA: a streamed step's largest parameter."""
    emb = torch.nn.Embedding(vocab, hidden)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight = emb.weight
    return torch.nn.ModuleDict({"emb": emb, "mid": mid, "head": head}).cuda()


def tied_embedding_backward(model: torch.nn.ModuleDict, step: int, tokens: int) -> None:
    """A bf16-autocast language-model loss and its backward on 4 rows of ``tokens`` random ids (seeded by ``step``)."""
    vocab = model["emb"].num_embeddings
    x = torch.randint(0, vocab, (4, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model["head"](model["mid"](model["emb"](x)))
    logits.float().log_softmax(-1).mean().neg().backward()


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tiny_grpo(model="tiny-llama", **overrides):
    """A seeded GRPO module for quick CPU fits: 2 generations of up to 4 tokens, plain prompts of up to 16 tokens."""
    from lightning_rl import GRPO

    L.seed_everything(0, verbose=False)
    args = dict(reward_funcs=[high_ids], model=model, num_generations=2, sampling={"max_new_tokens": 4},
                learning_rate=3e-3, logprob_backend="reference", chat_template=False, max_prompt_length=16)
    args.update(overrides)
    return GRPO(**args)


def host_steps_on_a_cpu(monkeypatch) -> list[int]:
    """Make host masters' gradients wait in host memory during the backward, as on CUDA, so ``step_on_host`` steps
    on a CPU; returns the list that gets the number of parameters of each step's CPU share."""
    import lightning_rl.plugins.host_residency as host_residency
    import lightning_rl.plugins.streamed_states as streamed_states

    monkeypatch.setattr(host_residency, "sends_gradients_to_host", lambda device: True)
    on_cpu: list[int] = []

    class CountedHostStep(streamed_states.HostStep):
        def __init__(self, optimizer, params, *args, **kwargs):
            on_cpu.append(len(params))
            super().__init__(optimizer, params, *args, **kwargs)

    monkeypatch.setattr(streamed_states, "HostStep", CountedHostStep)
    return on_cpu


def plugin_trainer(plugin, steps=2, callbacks=(), **kwargs):
    """A quiet CPU Trainer with one precision plugin."""
    return make_trainer(max_steps=steps, callbacks=callbacks, plugins=[plugin], **kwargs)


# ----------------------------------------------------------------------------- VLLMRollout without vLLM
SUM_ROWS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)]


class FakeEngine:
    """Records calls; generates with transformers on the live policy."""

    def __init__(self, module, calls, needs_sync_after_sleep=False):
        from lightning_rl.rollout import HFEngine

        self.calls = calls
        self.module = module
        self.inner = HFEngine(lambda: module.policy, module.tokenizer.pad_token_id, module.eos_token_ids)
        self.needs_sync = False
        self.needs_sync_after_sleep = needs_sync_after_sleep
        calls.append("create")

    def wake_up(self):
        self.calls.append("wake")

    def sync_weights(self, model):
        assert model is self.module.policy
        self.needs_sync = False
        self.calls.append("sync")

    def generate(self, prompt_ids, sampling, num_generations):
        self.calls.append("generate")
        return self.inner.generate(prompt_ids, sampling, num_generations)

    def sleep(self):
        self.calls.append("sleep")
        self.needs_sync = self.needs_sync_after_sleep

    def shutdown(self):
        self.calls.append("shutdown")


def rollout_grpo(**kw):
    """The GRPO module of the VLLMRollout tests: tiny-llama rewarded by completion length, 2 generations."""
    from lightning_rl import GRPO

    args = dict(reward_funcs=[lambda prompts, completions, **_: [float(len(c)) for c in completions]],
                model="tiny-llama", num_generations=2, sampling={"max_new_tokens": 4}, chat_template=False,
                micro_batch_size=4, max_prompt_length=32)
    args.update(kw)
    return GRPO(**args)


def fake_rollout(calls, **kw):
    """A VLLMRollout whose engines are FakeEngines recording into ``calls``."""
    from lightning_rl import VLLMRollout

    return VLLMRollout(engine_factory=lambda module, n, seed: FakeEngine(module, calls, **kw))


def node_counting_backend(name, sizes, checkpointed=None):
    """A ``torch.compile`` backend that appends each graph's FX node count (its subgraphs', such as a checkpointed
    region's, included) to ``sizes`` and compiles it with the backend ``name``: a layer that compiled tells
    itself apart from one whose graph broke down to a stub. ``checkpointed``, a list: gets, per graph, how many
    checkpointed regions (``tag_activation_checkpoint`` calls) dynamo put in it."""
    from torch._dynamo import lookup_backend

    inner = lookup_backend(name)

    def backend(gm, example_inputs):
        sizes.append(sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)))
        if checkpointed is not None:
            checkpointed.append(sum("checkpoint" in str(getattr(n.target, "__name__", n.target))
                                    for n in gm.graph.nodes if n.op == "call_function"))
        return inner(gm, example_inputs)

    return backend
