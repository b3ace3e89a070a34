"""A LoRA policy whose frozen base is a (fake, vLLM-shaped) engine's merged weights, on CPU.

The policies compute in float64, so what remains between the shared and the plain policy is the merge's fp32
addition (as in the engine process), a relative 5e-10 here; the adapters themselves move the summed log-prob by
a relative 7e-3.

The engine here is :class:`FakeVLLMModel` (packed q/k/v and gate/up, padded vocabulary); "merging" writes
``W + s * B @ A`` from the pristine base into its storage, as the engine process does at each sync.
"""

import pytest
import torch
from test_shared_weights import FakeVLLMModel

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout.engine_weights import engine_weights, merged_weight
from lightning_rl.rollout.merged_base import StaleMergedBaseError, share_merged_base
from lightning_rl.rollout.shared_weights import frozen_base_parameters


def _policy(path, dtype):
    torch.manual_seed(0)
    model, _ = load_policy(path, dtype="float32")
    model = apply_lora(model.to(dtype), {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _engine_for(model):
    return FakeVLLMModel({k: v.detach().clone() for k, v in frozen_base_parameters(model).items()})


def _merge(model, share):
    """What the engine process does at a sync: each adapted weight = pristine base + its LoRA products."""
    with torch.no_grad():
        for w in engine_weights(model):
            if w.products:
                view = share.views[w.name][1]
                view.copy_(merged_weight(share.pristine[w.name], w.products).to(view.dtype))
    share.mark_synced()


def _loss(model, ids):
    logits = model(input_ids=ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum()


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def two_policies(saved_tiny_llama):
    path = saved_tiny_llama(2)
    return lambda dtype: (_policy(path, dtype), _policy(path, dtype))


def test_a_merged_shared_base_gives_the_policys_values_and_gradients_in_float64(two_policies):
    plain, shared = two_policies(torch.float64)
    engine = _engine_for(shared)
    share, reason = share_merged_base(shared, engine)
    assert reason is None and share.bytes_shared > 0
    engine_ptrs = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for _, p in engine.named_parameters()]
    for p in frozen_base_parameters(shared).values():  # the trainer holds no base of its own
        assert any(lo <= p.data_ptr() < hi for lo, hi in engine_ptrs)
    _merge(shared, share)
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    a, b = _loss(plain, ids), _loss(shared, ids)
    torch.testing.assert_close(b, a, rtol=1e-7, atol=0)  # the merge adds in fp32, as the engine process does
    a.backward()
    b.backward()
    ga, gb = _adapter_grads(plain), _adapter_grads(shared)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6)  # double-counted input gradients: 7e-2
    # the merged values differ from the pristine base (the adapters are not zero): the merge did real work
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(share.views[q][1], share.pristine[q])


def test_a_forward_after_an_optimizer_step_is_refused_until_the_engine_merges_again(two_policies):
    plain, shared = two_policies(torch.float64)
    share, _ = share_merged_base(shared, _engine_for(shared))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with pytest.raises(StaleMergedBaseError, match="sync the engine"):
        _loss(shared, ids)  # nothing merged yet
    _merge(shared, share)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, shared)]
    for m, opt in zip((plain, shared), opts, strict=True):
        _loss(m, ids).backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(StaleMergedBaseError):
        _loss(shared, ids)
    _merge(shared, share)
    torch.testing.assert_close(_loss(shared, ids), _loss(plain, ids), rtol=1e-7, atol=0)


def test_the_state_dict_holds_the_pristine_base_and_loading_into_the_shared_base_is_refused(two_policies):
    plain, shared = two_policies(torch.bfloat16)
    share, _ = share_merged_base(shared, _engine_for(shared))
    _merge(shared, share)
    state, reference = shared.state_dict(), plain.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key].cpu(), value), key
    key = next(k for k in state if k.endswith("q_proj.base_layer.weight"))
    param = dict(shared.named_parameters())[key]
    assert not torch.equal(param.detach(), reference[key])  # the parameter itself reads the merged weights
    with pytest.raises(RuntimeError, match="load the checkpoint before the engine starts"):
        shared.load_state_dict(reference)
    param.data = param.data.clone()  # e.g. a cast or a move: the forward would drop the adapter
    with pytest.raises(RuntimeError, match="no longer points at the engine's merged weights"):
        shared(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_unsharing_gives_private_pristine_copies_and_the_adapter_path_back(two_policies):
    plain, shared = two_policies(torch.float64)
    engine = _engine_for(shared)
    share, _ = share_merged_base(shared, engine)
    _merge(shared, share)
    share.unshare()
    assert not share.views and not share.hooks
    engine_ptrs = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for _, p in engine.named_parameters()]
    for name, p in frozen_base_parameters(shared).items():
        assert not any(lo <= p.data_ptr() < hi for lo, hi in engine_ptrs), name
        torch.testing.assert_close(p, frozen_base_parameters(plain)[name], rtol=0, atol=0)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_loss(shared, ids), _loss(plain, ids), rtol=1e-12, atol=1e-10)


def test_sharing_is_refused_with_the_reason_and_nothing_changed(two_policies, saved_tiny_llama):
    full, _ = load_policy(saved_tiny_llama(2), dtype="float32")
    assert share_merged_base(full, _engine_for(full))[1] == "the policy has no LoRA adapter"
    plain, shared = two_policies(torch.bfloat16)
    other = _engine_for(plain)
    with torch.no_grad():
        for _, p in other.named_parameters():
            p.add_(1)
    before = {n: p.data_ptr() for n, p in shared.named_parameters()}
    share, reason = share_merged_base(shared, other)
    assert "hold other values" in reason and not share.views and not share.hooks
    assert {n: p.data_ptr() for n, p in shared.named_parameters()} == before
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(_loss(shared, ids), _loss(plain, ids))  # no hook left behind
    model, _ = load_policy(saved_tiny_llama(2), dtype="float32")
    dropout = apply_lora(model, {"r": 4, "lora_dropout": 0.1})
    share, reason = share_merged_base(dropout, _engine_for(dropout))
    assert "LoRA dropout" in reason and not share.views


@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offloaded"])
def test_compiled_checkpointed_layers_run_the_hooks_added_after_their_first_compile(two_policies, offload):
    """Offloaded, the checkpoint's forward (gradients off) compiles the adapter-gradient hooks too: two graphs, no
    compile failure (which would send every layer back to eager)."""
    from lightning_rl.compiled_layers import compile_decoder_layers, decoder_layers
    from lightning_rl.models import enable_activation_checkpointing

    torch._dynamo.reset()
    plain, shared = two_policies(torch.float32)  # plain stays eager: dynamo would give both one graph
    enable_activation_checkpointing(plain)
    enable_activation_checkpointing(shared, offload=offload)
    compile_decoder_layers(shared, backend="aot_eager")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(9))
    _loss(shared, ids).backward()  # compiled before sharing: traced without the hooks
    share, _ = share_merged_base(shared, _engine_for(shared))  # resets the compiled code
    _merge(shared, share)
    torch._dynamo.utils.counters.clear()
    for m in (plain, shared):
        m.zero_grad()
    a, b = _loss(plain, ids), _loss(shared, ids)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    a.backward()
    b.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (2 if offload else 1)  # again, with the hooks
    assert all(layer.forward.__func__.failed is None for layer in decoder_layers(shared))
    ga, gb = _adapter_grads(plain), _adapter_grads(shared)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5)
    share.unshare()  # resets again: the layers compile without the hooks
    torch.testing.assert_close(_loss(shared, ids), _loss(plain, ids), rtol=1e-5, atol=0)
