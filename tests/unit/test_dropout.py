"""Dropout off in loaded models: train-mode forwards repeat exactly; LoRA's own dropout stays."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lightning_rl import load_policy
from lightning_rl.dropout import disable_dropout
from lightning_rl.lora import apply_lora


def _twice(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


def _saved_llama(tmp_path, attention_dropout: float) -> str:
    torch.manual_seed(0)
    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1, "attention_dropout": attention_dropout})
    net.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def test_attention_dropout_of_a_saved_llama_is_set_to_zero(tmp_path):
    net, _ = load_policy(_saved_llama(tmp_path, 0.3))
    a, b = _twice(net)
    assert not torch.equal(a, b)  # the loaded model drops attention weights in train mode
    assert disable_dropout(net) == 1  # one attention module
    a, b = _twice(net)
    assert torch.equal(a, b)
    assert net.config.attention_dropout == 0.3  # a saved model keeps the dropout it was loaded with


def test_dropout_modules_of_a_saved_gpt2_are_set_to_zero(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    a, b = _twice(net)
    assert not torch.equal(a, b)
    # the embeddings' dropout, and per layer the attention's two and the MLP's: all 0.1
    assert disable_dropout(net) == 1 + 2 * 3
    assert all(m.p == 0 for m in net.modules() if isinstance(m, torch.nn.Dropout))
    a, b = _twice(net)
    assert torch.equal(a, b)


def test_lora_dropout_is_kept_and_a_model_without_dropout_is_untouched(tmp_path):
    net, _ = load_policy(_saved_llama(tmp_path, 0.0))
    assert disable_dropout(net) == 0
    lora = apply_lora(net, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj"]})
    assert disable_dropout(lora) == 0
    rates = [m.p for n, m in lora.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert rates and all(p == 0.2 for p in rates)
