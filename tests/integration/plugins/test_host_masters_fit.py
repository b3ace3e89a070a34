"""MemoryAwarePrecision(master_weights="cpu") through Trainer.fit on CPU: bf16 weights while training, fp32
masters in checkpoints and back in the module after the fit, and a memory plan that counts half the bytes."""

import functools

import lightning as L
import pytest
import torch
from helpers import SAY_ROWS, host_steps_on_a_cpu, plugin_trainer, tiny_grpo
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import MemoryAwarePrecision, PromptDataModule
from lightning_rl.modules.policy import DEFAULT_LEARNING_RATE
from lightning_rl.plugins.memory_plan import GiB


class Dtypes(L.Callback):
    """The dtypes of a linear weight and of the embedding at each training batch's end."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        model = pl_module.policy.model
        self.seen.append((model.layers[0].self_attn.q_proj.weight.dtype, model.embed_tokens.weight.dtype))


def test_a_fit_trains_bf16_linear_weights_and_keeps_fp32_masters(saved_tiny_llama, tmp_path):
    module = tiny_grpo(saved_tiny_llama(1))
    module.configure_model()
    start = module.policy.model.layers[0].mlp.down_proj.weight.detach().clone()
    plugin = MemoryAwarePrecision(master_weights="cpu")
    dtypes = Dtypes()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    plugin_trainer(plugin, steps=3, callbacks=[dtypes, ckpt], enable_checkpointing=True).fit(
        module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert dtypes.seen == [(torch.bfloat16, torch.bfloat16)] * 3  # bf16 linear weights and embedding while training
    assert plugin.streams_optimizer_states and plugin.host_master_weights is None  # detached at the end
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)  # fp32 again after the fit
    down = module.policy.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(down, start)  # it trained
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    key = "policy.model.layers.0.mlp.down_proj.weight"
    assert saved[key].dtype == torch.float32 and torch.equal(saved[key], down)  # the masters, not bf16 copies
    assert not torch.equal(saved[key], saved[key].to(torch.bfloat16).float())  # more than bf16 precision
    emb = "policy.model.embed_tokens.weight"
    assert saved[emb].dtype == torch.float32 and torch.equal(saved[emb], module.policy.model.embed_tokens.weight)
    states = [t for st in plugin._optimizers[0].state.values() for t in st.values() if t.dim()]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_the_plan_counts_bf16_weights_and_gradients_and_no_casts_of_them(saved_tiny_llama):
    path = saved_tiny_llama(1)

    def plan(**kw):
        module = tiny_grpo(path, micro_batch_size=2)
        plugin = MemoryAwarePrecision(memory_budget=4 * GiB, **kw)
        plugin_trainer(plugin, steps=1).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        return plugin.memory_plan.train_parts

    fp32, host = plan(optimizer_states="cpu"), plan(master_weights="cpu")
    assert host["trainable weights"] < fp32["trainable weights"]
    assert host["gradients"] == host["trainable weights"] < fp32["gradients"]
    assert host["autocast weight casts"] < fp32["autocast weight casts"]
    # the linear weights and the embedding are nearly all the bytes: about half of them, plus the fp32 norms
    linear_share = (fp32["trainable weights"] - host["trainable weights"]) * 2 / fp32["trainable weights"]
    assert 0.2 < linear_share < 1


class Held(L.Callback):
    """Per training batch: the parameters whose gradients the backward sent to host memory, and the grad norm."""

    def __init__(self):
        self.seen, self.norms = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        held = trainer.precision_plugin.host_gradients
        self.seen.append(None if held is None else (len(held), len(held.held())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm_step"]))


@pytest.mark.parametrize("micro_batch_size", [None, 2], ids=["one-micro-batch", "two-micro-batches"])
def test_gradients_held_in_host_memory_train_as_gradients_on_the_device(saved_tiny_llama, monkeypatch,
                                                                         micro_batch_size):
    """What CUDA does with host masters (gradients to host memory in the backward), run on a CPU: the same fit."""
    import lightning_rl.plugins.host_residency as host_residency

    path = saved_tiny_llama(1)
    runs = {}
    for send in (False, True):
        monkeypatch.setattr(host_residency, "sends_gradients_to_host", lambda device, send=send: send)
        module = tiny_grpo(path, micro_batch_size=micro_batch_size, num_generations=2)
        plugin = MemoryAwarePrecision(master_weights="cpu")
        held = Held()
        plugin_trainer(plugin, steps=3, callbacks=[held]).fit(module, PromptDataModule(train_data=SAY_ROWS,
                                                                                       batch_size=2))
        runs[send] = (held, {n: p.detach().clone() for n, p in module.policy.named_parameters()})
    (kept, weights_kept), (sent, weights_sent) = runs[False], runs[True]
    assert kept.seen == [None] * 3
    managed = sent.seen[0][0]
    assert managed > 0 and sent.seen == [(managed, managed)] * 3  # every managed gradient waited in host memory
    assert kept.norms == pytest.approx(sent.norms, rel=1e-5)  # the module's norm counts the held gradients
    # clipped at 1.0 (the default): the factor may differ in its last bit, which can round a bf16 weight the other
    # way after the first step, and every later gradient then differs by bf16 roundings: within 1% of one step (lr)
    for name, w in weights_kept.items():
        torch.testing.assert_close(weights_sent[name], w, rtol=1e-4, atol=0.01 * 3e-3, msg=name)


@pytest.mark.parametrize("step_on_host", [True, 0.5, "auto"], ids=["all-on-the-cpu", "half", "auto"])
def test_a_fit_with_the_step_on_the_cpu_trains_as_the_streamed_step(saved_tiny_llama, monkeypatch, step_on_host):
    """``step_on_host`` through ``Trainer.fit``, gradients held in host memory as on CUDA: after one step the same
    masters as the streamed step (identical gradients), and each later step puts its share on the CPU."""
    on_cpu = host_steps_on_a_cpu(monkeypatch)
    path = saved_tiny_llama(1)

    def fit(steps, setting):
        module = tiny_grpo(path, num_generations=2)
        plugin = MemoryAwarePrecision(master_weights="cpu", step_on_host=setting)
        plugin_trainer(plugin, steps=steps).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        managed = sum(1 for n, _ in module.policy.named_parameters()  # linear weights and embeddings (tied here)
                      if n.endswith("proj.weight") or "embed" in n or "lm_head" in n)
        return {n: p.detach().clone() for n, p in module.policy.named_parameters()}, managed

    streamed, _ = fit(1, False)
    assert on_cpu == []
    stepped, managed = fit(1, step_on_host)
    assert len(on_cpu) == 1 and 0 < on_cpu[0] <= managed
    if step_on_host is True:
        assert on_cpu[0] == managed  # every host master stepped on the CPU
    else:
        assert on_cpu[0] < managed  # a share: the rest streamed beside it
    for name, w in streamed.items():
        torch.testing.assert_close(stepped[name], w, rtol=1e-5, atol=1e-7, msg=name)
    start, _ = fit(0, False)
    assert sum(not torch.equal(streamed[n], w) for n, w in start.items()) > len(start) // 2  # the step moved them
    on_cpu.clear()
    later, _ = fit(3, step_on_host)
    assert len(on_cpu) == 3 and all(0 < n <= managed for n in on_cpu)
    assert any(not torch.equal(later[n], w) for n, w in start.items())  # it trained


def test_the_default_host_step_leaves_an_optimizer_it_cannot_run_to_the_streamed_step(saved_tiny_llama, monkeypatch):
    """``step_on_host=None`` (the default) with SGD and host masters whose gradients wait in host memory: no step on
    the CPU, no refusal, and the same weights as ``step_on_host=False`` after two steps."""
    on_cpu = host_steps_on_a_cpu(monkeypatch)
    path = saved_tiny_llama(1)

    def fit(steps, **setting):
        module = tiny_grpo(path, num_generations=2, learning_rate=DEFAULT_LEARNING_RATE,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        plugin = MemoryAwarePrecision(master_weights="cpu", **setting)
        plugin_trainer(plugin, steps=steps).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        return {n: p.detach().clone() for n, p in module.policy.named_parameters()}

    default, off, start = fit(2), fit(2, step_on_host=False), fit(0)
    assert on_cpu == []  # SGD: nothing stepped on the CPU
    assert sum(not torch.equal(default[n], w) for n, w in start.items()) > len(start) // 2  # it trained
    for name, w in off.items():
        assert torch.equal(default[name], w), name
