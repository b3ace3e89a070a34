"""A LoRA policy under MemoryAwarePrecision is loaded in the plugin's frozen dtype, never first in fp32."""

import pytest
import torch
from helpers import make_trainer, plugin_trainer, tiny_grpo
from peft import LoraConfig

from lightning_rl import MemoryAwarePrecision
from lightning_rl.modules.load_dtype import policy_load_dtype

LORA = {"r": 4, "lora_alpha": 8}


@pytest.mark.parametrize(
    ("lora", "plugin", "expected"),
    [
        (LORA, MemoryAwarePrecision(), torch.bfloat16),  # the whole base is frozen: loaded as it is kept
        (None, MemoryAwarePrecision(), torch.float32),  # full fine-tune: fp32 masters
        (LORA, None, torch.float32),  # no trainer yet (evaluate() before a fit)
        (LORA, MemoryAwarePrecision(frozen_dtype="float32"), torch.float32),
        ({**LORA, "modules_to_save": ["lm_head"]}, MemoryAwarePrecision(), torch.float32),  # whole trainable copies
        (LoraConfig(r=4, modules_to_save=["lm_head"]), MemoryAwarePrecision(), torch.float32),
        (LoraConfig(r=4), MemoryAwarePrecision(), torch.bfloat16),
    ],
)
def test_policy_load_dtype(lora, plugin, expected):
    assert policy_load_dtype("float32", lora, plugin) == expected


def test_a_narrower_module_dtype_is_kept():
    assert policy_load_dtype("float16", LORA, MemoryAwarePrecision(frozen_dtype="bfloat16")) == torch.float16


@pytest.mark.parametrize("with_plugin", [True, False])
def test_lora_policy_from_a_folder_loads_its_base_in_the_plugins_dtype(saved_tiny_llama, monkeypatch, with_plugin):
    import lightning_rl.modules.policy as policy_mod

    loaded = []
    real = policy_mod.load_policy

    def spy(model, config, dtype):
        net, tok = real(model, config, dtype)
        loaded.append({p.dtype for p in net.parameters()})
        return net, tok

    monkeypatch.setattr(policy_mod, "load_policy", spy)
    grpo = tiny_grpo(model=saved_tiny_llama(), lora=LORA)
    plugin = MemoryAwarePrecision()
    grpo.trainer = plugin_trainer(plugin) if with_plugin else make_trainer(precision="bf16-mixed")
    grpo.configure_model()
    assert loaded == [{torch.bfloat16 if with_plugin else torch.float32}]
    if with_plugin:
        plugin.convert_module(grpo)
    for name, p in grpo.policy.named_parameters():  # adapters are fp32 masters either way
        want = torch.float32 if p.requires_grad or not with_plugin else torch.bfloat16
        assert p.dtype == want, name
    assert any(p.requires_grad for p in grpo.policy.parameters())
