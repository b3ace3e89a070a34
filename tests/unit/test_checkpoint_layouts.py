"""Compiled, offloaded layers under both places transformers checkpoints a layer: ``__call__`` (up to 5.22, the
GPU machine's 5.17) and the class's ``forward`` (5.23 and later). Under the first, the offloaded checkpoint's
forward ran the layer eagerly (gradients are off there): on an H100 profile of a SmolLM2 LoRA step, 420 eager
``aten::linear`` calls and one compiled graph instead of two."""

import functools

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from lightning_rl.checkpoint_offload import in_checkpoint_forward, offload_layer_inputs
from lightning_rl.compiled_layers import checkpoint_wrapped, compile_decoder_layers


class CallCheckpointedDecoderLayer(nn.Module):
    """A decoder layer checkpointed as transformers up to 5.22 does it: in ``__call__``, around the module call, in
    train mode whatever the gradient mode (transformers sets ``_gradient_checkpointing_func``)."""

    gradient_checkpointing = False

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, hidden, scale=1.0):
        return hidden + scale * self.down(nn.functional.silu(self.up(self.norm(hidden))))

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)


class Stack(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CallCheckpointedDecoderLayer() for _ in range(n))

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
        return hidden


def checkpointed_stack(offload: bool) -> Stack:
    torch.manual_seed(0)
    model = Stack().train()
    for layer in model.layers:  # what transformers' gradient_checkpointing_enable(use_reentrant=False) sets
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        if offload:
            offload_layer_inputs(layer)
    return model


def update(model, hidden):
    out = model(hidden)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "kept"])
def test_a_layer_checkpointed_in_call_runs_every_pass_of_the_update_compiled(moved_to_host, offload):
    """Offloaded: the checkpoint's forward (gradients off) and the recompute (on) each run one compiled graph of the
    whole layer, no layer runs eagerly, and the numbers are those of eager layers without checkpoints."""
    from helpers import node_counting_backend

    # the input needs a gradient, as a trained embedding's output does (and LoRA's, enable_input_require_grads)
    hidden = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    torch.manual_seed(0)
    reference = Stack().train()
    expected = update(reference, hidden)

    torch._dynamo.reset()
    counters.clear()
    model = checkpointed_stack(offload)
    nodes = []
    assert compile_decoder_layers(model, backend=node_counting_backend("aot_eager", nodes)) == 3
    update(model, hidden)  # compiles
    model.zero_grad()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, grads = update(model, hidden)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::linear", 0) == 0, "a layer ran eagerly in the update"  # compiled graphs run mm/addmm
    assert sum(counters["graph_break"].values()) == 0
    # offloaded: a graph without autograd (the checkpoint's forward) and one with it (the recompute); kept: torch's
    # checkpoint calls the compiled layer with gradients on in both passes, one graph. Each is the whole layer.
    assert counters["stats"]["unique_graphs"] == (2 if offload else 1)
    assert min(nodes) >= 8, nodes
    assert len(moved_to_host) == (2 * 3 if offload else 0)  # each layer's input, in both updates
    torch.testing.assert_close(out, expected[0])
    for a, b in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(a, b)


def test_a_layer_checkpointed_in_call_offloads_nothing_without_gradients(moved_to_host):
    """transformers up to 5.22 checkpoints in train mode with gradients off too: nothing is recomputed then, so
    nothing goes to host memory, and the layer runs as it is."""
    model = checkpointed_stack(offload=True)
    hidden = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = model(hidden)
    assert moved_to_host == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(hidden), rtol=0, atol=0)


def test_the_checkpoint_forward_flag_holds_only_inside_an_offloaded_forward():
    seen = []
    model = checkpointed_stack(offload=True)
    model.layers[0].norm.register_forward_hook(lambda *_: seen.append(in_checkpoint_forward()))
    update(model, torch.randn(1, 3, 16))
    assert seen == [True, False]  # the forward (gradients off), then the backward's recompute
    assert not in_checkpoint_forward()


def test_only_transformers_checkpoint_wrapper_is_unwrapped():
    """``deprecate_kwarg`` and other decorators set ``__wrapped__`` as well; unwrapping one of them would checkpoint
    a layer twice under transformers up to 5.22, which checkpoints in ``__call__``."""

    def forward(self, hidden):
        return hidden

    @functools.wraps(forward)
    def deprecated(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    @functools.wraps(forward)
    def forward_with_checkpointing(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    assert checkpoint_wrapped(forward) is None
    assert checkpoint_wrapped(deprecated) is None
    assert checkpoint_wrapped(forward_with_checkpointing) is forward
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    in_forward = "__call__" not in vars(GradientCheckpointingLayer)  # 5.23 and later
    assert (checkpoint_wrapped(LlamaDecoderLayer.forward) is not None) == in_forward
