"""Sharing a LoRA policy's frozen base weights with a (fake, vLLM-shaped) engine model, on CPU."""

import torch
from torch import nn

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout.shared_weights import (
    base_weight_views,
    frozen_base_parameters,
    park_base_on_host,
    share_base_with_engine,
)


class FakeVLLMModel(nn.Module):
    """vLLM's layout: q/k/v packed into qkv_proj, gate/up into gate_up_proj, vocabulary rows padded to 64."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, hf_params: dict[str, torch.Tensor]):
        super().__init__()
        fused: dict[str, torch.Tensor] = {}
        for name, t in hf_params.items():
            parent, module, leaf = name.rsplit(".", 2)
            for target, parts in self.packed_modules_mapping.items():
                if module in parts:
                    key = f"{parent}.{target}.{leaf}"
                    fused[key] = torch.cat([hf_params[f"{parent}.{p}.{leaf}"] for p in parts])
                    break
            else:
                if module == "embed_tokens":
                    pad = -t.shape[0] % 64
                    t = torch.cat([t, torch.zeros(pad + 64, t.shape[1], dtype=t.dtype)])
                fused[name] = t.clone()
        self.store = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                                       for k, v in fused.items()})

    def named_parameters(self, *args, **kwargs):
        for k, v in self.store.items():
            yield k.replace("__", "."), v


def _lora_policy(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model, _ = load_policy("tiny-llama")
    model = apply_lora(model.to(dtype), {"r": 4, "lora_alpha": 8})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_views_cover_every_frozen_parameter_and_share_one_copy():
    model = _lora_policy()
    base = frozen_base_parameters(model)
    engine = FakeVLLMModel({k: v.detach() for k, v in base.items()})
    ids = torch.randint(0, 100, (2, 9))
    before = _logits(model, ids)

    shared, reason = share_base_with_engine(model, engine)
    assert reason is None
    assert set(shared.views) == set(base)
    assert shared.bytes_shared == sum(p.numel() * p.element_size() for p in base.values())
    engine_ptrs = {}
    for name, p in engine.named_parameters():
        start = p.data_ptr()
        engine_ptrs[name] = (start, start + p.numel() * p.element_size())
    for name, p in frozen_base_parameters(model).items():  # every trainer base weight lives inside an engine tensor
        assert any(lo <= p.data_ptr() < hi for lo, hi in engine_ptrs.values()), name
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)

    # the trainer reads the engine's memory: a change there shows in the trainer
    qkv = dict(engine.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    q = frozen_base_parameters(model)["model.layers.0.self_attn.q_proj.weight"]
    k = frozen_base_parameters(model)["model.layers.0.self_attn.k_proj.weight"]
    with torch.no_grad():
        qkv[q.shape[0]].fill_(3.0)  # first row of k_proj
    assert torch.all(k[0] == 3.0)

    shared.unshare()  # private copies again: the engine's memory may go away
    with torch.no_grad():
        qkv.zero_()
    assert torch.all(k[0] == 3.0)
    assert not shared.views


def test_lora_still_trains_on_shared_base():
    model = _lora_policy()
    engine = FakeVLLMModel({k: v.detach() for k, v in frozen_base_parameters(model).items()})
    shared, reason = share_base_with_engine(model, engine)
    assert reason is None
    snapshot = {k: v.detach().clone() for k, v in engine.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 100, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    for k, v in engine.named_parameters():  # training touched only the adapter
        assert torch.equal(v, snapshot[k]), k


def test_refuses_other_dtype_or_values():
    model = _lora_policy()
    base = frozen_base_parameters(model)
    views, reason = base_weight_views(model, FakeVLLMModel({k: v.detach().float() for k, v in base.items()}))
    assert views == {} and "same dtype" in reason
    other = {k: v.detach().clone() for k, v in base.items()}
    other["model.layers.1.mlp.up_proj.weight"] += 1
    views, reason = base_weight_views(model, FakeVLLMModel(other))
    assert views == {} and "other values" in reason
    missing = {k: v.detach() for k, v in base.items() if "norm" not in k}
    views, reason = base_weight_views(model, FakeVLLMModel(missing))
    assert views == {} and "no parameter" in reason
    # nothing was changed by the refusals
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(base.values(), frozen_base_parameters(model).values()))


def test_nothing_is_parked_when_the_base_cannot_be_shared():
    model = _lora_policy(torch.float32)
    before = {n: p.data_ptr() for n, p in frozen_base_parameters(model).items()}
    parked, reason = park_base_on_host(model, torch.bfloat16)
    assert not parked.devices and "torch.float32 on cpu" in reason and "torch.bfloat16" in reason
    parked, reason = park_base_on_host(_lora_policy(), torch.bfloat16)  # bf16, but not on a GPU
    assert not parked.devices and "on cpu" in reason
    assert before == {n: p.data_ptr() for n, p in frozen_base_parameters(model).items()}
