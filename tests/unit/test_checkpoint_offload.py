"""Offloaded checkpoints: only each layer's input leaves for host memory, nothing else stays in autograd's graph, and
the outputs and gradients are plain checkpointing's (autocast and dropout replayed), eager or compiled."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_rl.checkpoint_offload import from_host, offloaded_checkpoint, to_host
from lightning_rl.compiled_layers import compile_decoder_layers, decoder_layers
from lightning_rl.models import enable_activation_checkpointing


@pytest.fixture
def saved_policy(tiny_llama_loader):
    """Loads a 3-layer tiny-llama saved to a folder with from_pretrained (fp32, eval mode)."""
    return tiny_llama_loader(3)


def run(model, ids, saved=None):
    """Logits and gradients of one bf16-autocast training pass; ``saved`` collects the shapes autograd keeps."""
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16), (hooks if saved is not None else torch.enable_grad()):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_offloaded_checkpoints_keep_only_each_layers_input_and_match_plain_checkpoints(
        saved_policy, moved_to_host, compiled):
    """The residual stream entering each layer goes to host memory and is all a layer leaves for the backward (no
    MLP activation stays in autograd's graph: on an H200 the first, hook-based offload kept them all around compiled
    layers); logits and gradients equal plain checkpointing's bit for bit; compiled layers compile whole layers
    without a graph break."""
    from helpers import node_counting_backend

    models = {"plain": saved_policy(), "offloaded": saved_policy(), "none": saved_policy()}
    enable_activation_checkpointing(models["plain"])
    enable_activation_checkpointing(models["offloaded"], offload=True)
    intermediate = models["none"].config.intermediate_size
    ids = torch.randint(0, models["none"].config.vocab_size, (2, 13))
    results, saved, graphs = {}, {}, {}
    for name, m in models.items():
        torch._dynamo.reset()
        counters.clear()
        m.train()
        nodes, saved[name] = [], []
        if compiled:
            compile_decoder_layers(m, backend=node_counting_backend("aot_eager", nodes))
        moved_to_host.clear()
        results[name] = run(m, ids, saved[name])
        graphs[name] = (nodes, sum(counters["graph_break"].values()))
        if name == "offloaded":
            assert moved_to_host == [(2, 13, m.config.hidden_size)] * 3  # one input per layer, nothing else
        else:
            assert moved_to_host == []
    assert sum(intermediate in s for s in saved["none"]) >= 3  # without checkpoints the MLPs' activations stay
    assert not any(intermediate in s for s in saved["offloaded"])
    (lp, gp), (lo, go) = results["plain"], results["offloaded"]
    torch.testing.assert_close(lo, lp, rtol=0, atol=0)
    for a, b in zip(go, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    nodes, breaks = graphs["offloaded"]
    # compiled: the layer's math without autograd (the forward) and with it (the recompute), each a whole layer
    # (74-78 nodes here; a graph broken down to a stub has a handful)
    assert breaks == 0 and (len(nodes) >= 2 and min(nodes) > 50 if compiled else nodes == []), graphs


def test_offloaded_checkpoints_move_nothing_outside_a_training_forward_and_come_off(saved_policy, moved_to_host):
    model = saved_policy()
    enable_activation_checkpointing(model, offload=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.eval()
    model(input_ids=ids).logits.sum().backward()  # eval mode: no recompute, nothing offloaded
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert moved_to_host == []
    layer = decoder_layers(model)[1]
    layer.mlp.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids)
    del layer.mlp.forward
    moved_to_host.clear()
    run(model, ids)
    assert len(moved_to_host) == 3  # the next forward offloads as before
    moved_to_host.clear()
    enable_activation_checkpointing(model)  # off again
    run(model, ids)
    assert moved_to_host == []


class DropoutLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.drop = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Dropout(0.5)

    def forward(self, x, scale=None):
        y = self.down(self.drop(torch.relu(self.up(x))))
        return x + (y if scale is None else scale * y)


def grads_of(layer, hidden, scale, checkpoint):
    layer.zero_grad()
    torch.manual_seed(7)
    out = checkpoint(lambda h, s: layer(h, s), hidden, scale) if checkpoint else layer(hidden, scale)
    torch.manual_seed(123)  # the random state moves on before the backward: the recompute must replay the forward's
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "kept"])
def test_offloaded_checkpoint_replays_dropout_and_reaches_parameters_when_the_input_needs_no_gradient(
        moved_to_host, offload):
    """A frozen embedding (LoRA) gives the first layer an input without gradient: the parameters still get theirs;
    the recompute replays the forward's dropout mask, so the gradients are those of no checkpointing at all, with
    the input offloaded or kept on its device (``offload=False``, the compiled layers' reentrant checkpoint)."""
    torch.manual_seed(0)
    layer, hidden = DropoutLayer().train(), torch.randn(4, 8)
    ref_out, ref = grads_of(layer, hidden, None, checkpoint=None)
    checkpoint = functools.partial(offloaded_checkpoint, offload=offload)
    out, got = grads_of(layer, hidden, None, checkpoint=checkpoint)
    assert len(moved_to_host) == (1 if offload else 0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offloaded_checkpoint_falls_back_where_another_argument_needs_a_gradient(moved_to_host):
    """The reentrant form differentiates only the layer's input and parameters: a second argument that requires
    grad goes through PyTorch's own checkpoint (nothing offloaded) and gets its gradient."""
    torch.manual_seed(0)
    layer, hidden = DropoutLayer().eval(), torch.randn(4, 8, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    offloaded_checkpoint(lambda h, s: layer(h, s), hidden, scale).sum().backward()
    expected = torch.autograd.grad(layer(hidden, scale).sum(), scale)[0]
    torch.testing.assert_close(scale.grad, expected)
    assert hidden.grad is not None and moved_to_host == []


def test_a_strided_input_comes_back_from_host_memory_with_its_values():
    hidden = torch.randn(2, 5, 8).transpose(1, 2)
    host, event = to_host(hidden)
    back = from_host(host, event, hidden.device)
    assert torch.equal(back, hidden) and back.data_ptr() != hidden.data_ptr()


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "kept"])
def test_a_second_backward_through_an_offloaded_checkpoint_names_the_setting_to_turn_off(offload):
    layer, hidden = DropoutLayer().eval(), torch.randn(4, 8, requires_grad=True)
    out = offloaded_checkpoint(lambda h, s: layer(h, s), hidden, None, offload=offload).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="offload_checkpoints=False"):
        out.backward()


def test_a_kept_input_changed_in_place_before_the_backward_is_refused():
    """With the input kept on the device, autograd's saved-tensor check catches an in-place change before the
    recomputation would read the changed values."""
    layer, hidden = DropoutLayer().eval(), torch.randn(4, 8, requires_grad=True)
    base = hidden.detach().clone()
    out = offloaded_checkpoint(lambda h, s: layer(h, s), base, None, offload=False).sum()
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_compiled_lora_layers_offloaded_get_plain_checkpointings_adapter_gradients(saved_policy, moved_to_host):
    """LoRA (the frozen embedding's output made to require grad, as the module does) through compiled, offloaded
    layers: the same adapter gradients as plain checkpointing's, bit for bit, and only the adapters get any."""
    from lightning_rl.lora import apply_lora

    spec = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]}
    ids = torch.randint(0, 64, (2, 11))
    grads = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = apply_lora(saved_policy(), spec)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B starts at zero: give A a gradient too
        model.train()
        enable_activation_checkpointing(model.base_model.model, offload=offload)
        model.base_model.model.enable_input_require_grads()
        torch._dynamo.reset()
        compile_decoder_layers(model, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
        grads[offload] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(moved_to_host) == 3
    assert set(grads[True]) == set(grads[False]) and all("lora_" in n for n in grads[True]) and len(grads[True]) == 24
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=0, msg=name)
