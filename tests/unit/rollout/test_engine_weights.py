"""What the engine process loads: plain parameters, or LoRA base weights merged with their adapters as it loads."""

import copy
import os

import pytest
import torch

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout.engine_weights import engine_weights, merge_unsupported_reason, merged_weight
from lightning_rl.rollout.vllm_worker import PolicyWeightReceiver


def _lora(spec=None, seed=0):
    net, _ = load_policy("tiny-llama", dtype="float32")
    torch.manual_seed(seed)
    peft = apply_lora(net, {"r": 4, "lora_alpha": 8, **(spec or {})})
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the merge would add nothing
            torch.nn.init.normal_(p, std=0.5)
    return peft


def test_full_weights_are_the_trainers_own_parameters():
    net, _ = load_policy("tiny-llama", dtype="float32")
    weights = engine_weights(net)
    params = dict(net.named_parameters())
    assert [w.name for w in weights] == list(params)
    assert all(w.base.data_ptr() == params[w.name].data_ptr() and not w.products for w in weights)


def test_lora_weights_merge_to_what_peft_merges():
    peft = _lora()
    weights = engine_weights(peft)
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    merged = {w.name: merged_weight(w.base, w.products) for w in weights}
    assert set(merged) <= set(expected) and not any("lora_" in n or "base_layer" in n for n in merged)
    with_products = [w for w in weights if w.products]
    # every linear of the decoder layers carries the adapter ("all-linear" leaves the LM head out)
    assert len(with_products) == 7 * peft.config.num_hidden_layers
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = [w.name for w in with_products if not torch.equal(merged[w.name], w.base)]
    assert len(changed) == len(with_products)  # the products are not zero
    # views of the trainer's tensors, no copies: the engine process reads them where they are
    params = {p.data_ptr() for p in peft.parameters()}
    assert all(t.data_ptr() in params for w in weights for t in w.tensors())


def test_merging_leaves_the_base_weight_alone_and_follows_the_adapter():
    peft = _lora()
    w = next(w for w in engine_weights(peft) if w.products)
    before = w.base.clone()
    first = merged_weight(w.base, w.products)
    assert torch.equal(w.base, before)
    with torch.no_grad():
        w.products[0].b.add_(1.0)  # an optimizer step on lora_B, in place
    second = merged_weight(w.base, w.products)
    expected = before.double() + w.products[0].scale * (w.products[0].b.double() @ w.products[0].a.double())
    torch.testing.assert_close(second.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


def test_a_bf16_base_merges_in_fp32():
    peft = _lora()
    peft.get_base_model().to(torch.bfloat16)
    w = next(w for w in engine_weights(peft) if w.products)
    out = merged_weight(w.base, w.products)
    assert out.dtype == torch.float32
    p = w.products[0]
    torch.testing.assert_close(out, w.base.float() + p.scale * p.b.float() @ p.a.float())


@pytest.mark.parametrize(("spec", "reason"), [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "LoRA biases"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "Embedding"),
])
def test_adapters_the_engine_process_cannot_merge_are_named(spec, reason):
    peft = _lora(spec)
    assert reason in merge_unsupported_reason(peft)
    with pytest.raises(ValueError, match="cannot merge this LoRA adapter"):
        engine_weights(peft)


def test_plain_lora_and_full_models_merge():
    net, _ = load_policy("tiny-llama", dtype="float32")
    assert merge_unsupported_reason(net) is None
    assert merge_unsupported_reason(_lora()) is None


class _Runner:
    def __init__(self):
        self.loaded = []

    def get_model(self):
        return self

    def load_weights(self, weights):
        self.loaded = [(name, t.clone()) for name, t in weights]


def test_the_worker_loads_merged_weights_one_at_a_time():
    peft = _lora()
    weights = engine_weights(peft)
    receiver = PolicyWeightReceiver()
    receiver.model_runner = _Runner()
    with pytest.raises(RuntimeError, match="before lightning_rl_attach"):
        receiver.lightning_rl_load()
    receiver._lightning_rl_weights = [(w.name, w.base, w.products) for w in weights]  # what attach opens
    assert receiver.lightning_rl_load() == len(weights)
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    for name, tensor in receiver.model_runner.loaded:
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_module_to_save_reaches_the_engine_as_its_trained_copy():
    peft = _lora({"modules_to_save": ["norm"]})
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)  # the trained copy moves away from the original
    weights = {w.name: merged_weight(w.base, w.products) for w in engine_weights(peft)}
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    torch.testing.assert_close(weights["model.norm.weight"], expected["model.norm.weight"])
    assert not torch.equal(weights["model.norm.weight"], peft.get_base_model().model.norm.original_module.weight)


def test_the_engine_processs_memory_breakdown_is_empty_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert PolicyWeightReceiver().lightning_rl_memory() == {}
    assert PolicyWeightReceiver().lightning_rl_release_cache() == 0


def test_the_engine_process_reports_its_id_and_the_mps_priority_in_its_own_environment(monkeypatch):
    monkeypatch.setenv("CUDA_MPS_CLIENT_PRIORITY", "0")
    assert PolicyWeightReceiver().lightning_rl_process() == {"pid": os.getpid(), "mps_client_priority": "0"}
    monkeypatch.delenv("CUDA_MPS_CLIENT_PRIORITY")
    assert PolicyWeightReceiver().lightning_rl_process()["mps_client_priority"] is None
