"""MemoryAwarePrecision(master_weights="cpu") through Trainer.fit on CPU: bf16 weights while training, fp32
masters in checkpoints and back in the module after the fit, and a memory plan that counts half the bytes."""

import lightning as L
import torch
from helpers import SAY_ROWS, plugin_trainer, tiny_grpo
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import MemoryAwarePrecision, PromptDataModule
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
