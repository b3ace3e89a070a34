"""Exports of a module in memory write what it trained: the LoRA update merged in fp32 over a bf16 base, the fp32
host masters during a fit, and adapter weights in the asked dtype."""

import lightning as L
import torch
from helpers import SAY_ROWS, make_trainer, tiny_grpo
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_rl import MemoryAwarePrecision, PromptDataModule
from lightning_rl.models import save_policy


def lora_updates(module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{merged weight name: (base weight, B @ A * scaling)}`` of each LoRA layer of the module's policy."""
    out = {}
    for name, layer in module.policy.base_model.model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
            out[f"{name}.weight"] = (layer.base_layer.weight.detach(), delta.detach())
    return out


def assert_update_kept(weights: dict[str, torch.Tensor], updates) -> None:
    for name, (base, delta) in updates.items():
        assert base.dtype == torch.bfloat16  # the plugin keeps the frozen base so: merging in it would round
        got = weights[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, base.float() + delta.float(), rtol=0, atol=1e-7)
        written = got - base.float()
        assert (written - delta).norm() < 1e-3 * delta.norm()  # was 0.75: most of the update rounded away


def test_merged_exports_after_a_memory_aware_lora_fit_keep_the_trained_update(saved_tiny_llama, tmp_path):
    module = tiny_grpo(saved_tiny_llama(1), lora={"r": 4}, learning_rate=1e-5)  # updates below bf16's resolution
    make_trainer(max_steps=3, plugins=[MemoryAwarePrecision()]).fit(
        module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    updates = lora_updates(module)
    assert updates and all(delta.abs().max() > 0 for _, delta in updates.values())

    out = module.export(tmp_path / "merged", merge=True)  # the module's dtype: float32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_update_kept(dict(model.named_parameters()), updates)

    path = save_policy(module.policy, module.tokenizer, tmp_path / "saved")
    assert_update_kept(dict(AutoModelForCausalLM.from_pretrained(path).named_parameters()), updates)

    half = module.export(tmp_path / "merged16", merge=True, dtype="bfloat16")
    got = load_file(half / "model.safetensors")
    for name, (base, delta) in updates.items():  # merged in fp32, rounded once at the end
        assert torch.equal(got[name], (base.float() + delta.float()).to(torch.bfloat16))


class ExportDuringFit(L.Callback):
    """At the second step: the policy's state dict (host masters put the fp32 masters in it) and an export."""

    def __init__(self, out):
        self.out = out
        self.masters = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != 2:
            return
        self.masters = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}
        plugin = trainer.precision_plugin
        assert plugin.host_master_weights is not None

        def refuse(memo):
            raise AssertionError("the export copied the trainer or its precision plugin")

        for obj in (trainer, plugin, plugin.host_master_weights):
            obj.__deepcopy__ = refuse  # copy.deepcopy looks the method up on the object
        try:
            pl_module.export(self.out)
        finally:
            for obj in (trainer, plugin, plugin.host_master_weights):
                del obj.__deepcopy__


def test_an_export_during_a_fit_with_host_masters_writes_the_fp32_masters(saved_tiny_llama, tmp_path):
    module = tiny_grpo(saved_tiny_llama(1), learning_rate=1e-3)
    export = ExportDuringFit(tmp_path / "exported")
    make_trainer(max_steps=3, callbacks=[export], plugins=[MemoryAwarePrecision(master_weights="cpu")]).fit(
        module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    assert export.masters is not None
    written = load_file(export.out / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    master = export.masters[key]
    assert master.dtype == torch.float32 and not torch.equal(master, master.bfloat16().float())  # finer than bf16
    assert written.keys() <= export.masters.keys()
    for name, tensor in written.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, export.masters[name]), name


def test_an_adapter_export_writes_the_asked_dtype_and_says_so(saved_tiny_llama, tmp_path):
    module = tiny_grpo(saved_tiny_llama(1), lora={"r": 4})
    module.configure_model()
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # a trained-looking adapter
    trained = {k: v.clone() for k, v in module.policy.state_dict().items() if "lora_" in k}
    out = module.export(tmp_path / "adapter", dtype="bfloat16")
    written = load_file(out / "adapter_model.safetensors")
    assert written and {t.dtype for t in written.values()} == {torch.bfloat16}
    assert len(written) == len(trained)
    for key, value in trained.items():
        assert torch.equal(written[key.replace(".default", "")], value.to(torch.bfloat16)), key
    card = (out / "README.md").read_text()
    assert "adapter, bfloat16" in card.splitlines()[0]
    assert "the adapter's are bfloat16; the base's are as its source has them" in card
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # loads the base folder it names
    assert any("lora_B" in k for k in model.state_dict())
