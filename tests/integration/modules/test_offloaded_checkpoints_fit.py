"""A checkpointed, compiled GRPO fit with each layer's input offloaded trains as without the offload (CPU)."""

import functools

import torch
from torch._dynamo.utils import counters


def test_a_compiled_fit_with_offloaded_layer_inputs_trains_as_without(saved_tiny_llama, moved_to_host, monkeypatch):
    """The GPU defaults beside an engine process (recomputed and compiled layers, offloaded inputs) on a CPU, where
    the module itself never offloads: the offload is switched on by hand. Same weights after two steps, whole layers
    compiled, and each layer's input moved to host memory in every update forward. (Padded: a CPU's packed
    attention breaks the compiled graph, offloaded or not.)"""
    from helpers import SAY_ROWS, make_trainer, node_counting_backend, tiny_grpo

    import lightning_rl.modules.policy as policy
    from lightning_rl import PromptDataModule
    from lightning_rl.compiled_layers import compile_decoder_layers
    from lightning_rl.models import enable_activation_checkpointing

    path = saved_tiny_llama(2)
    runs, graphs = [], []
    for offload in (False, True):
        nodes = []
        compile_aot_eager = functools.partial(compile_decoder_layers, backend=node_counting_backend("aot_eager", nodes))
        monkeypatch.setattr(policy, "compile_decoder_layers", compile_aot_eager)
        monkeypatch.setattr(policy, "enable_activation_checkpointing",
                            lambda net, offload=False, on=offload: enable_activation_checkpointing(net, offload=on))
        torch._dynamo.reset()
        counters.clear()
        module = tiny_grpo(path, pack_sequences=False, gradient_checkpointing=True, compile_layers=True)
        make_trainer(max_steps=2).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        runs.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})
        graphs.append((nodes, sum(counters["graph_break"].values())))
    # whole layers without a break: one graph with the checkpoint inside; offloaded, the layer's math without
    # autograd (its forward) and with it (the recompute), checkpointed outside the graph
    assert all(breaks == 0 and len(nodes) >= 2 and min(nodes) > 50 for nodes, breaks in graphs), graphs
    assert moved_to_host and all(len(shape) == 3 for shape in moved_to_host)  # [sequences, tokens, hidden] only
    assert len(moved_to_host) % 2 == 0 and moved_to_host[0::2] == moved_to_host[1::2]  # both layers, every forward
    for name, w in runs[0].items():
        torch.testing.assert_close(runs[1][name], w, rtol=0, atol=0, msg=name)
