"""Compiled decoder layers on a GPU (inductor, bf16 autocast, the Triton log-prob kernel): the update's numbers
match the eager layers, and rollouts of new lengths and paddings reuse the compiled code."""

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_rl.compiled_layers import compile_decoder_layers
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.models import enable_activation_checkpointing, load_policy

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True)


def _policy(path):
    model, _ = load_policy(str(path))  # fp32 master weights, as GRPO loads them
    model = model.cuda().train()
    enable_activation_checkpointing(model)
    return model


def _rollout(n, prompt_len, new_tokens, seed, padded=True):
    """A ragged rollout batch: left-padded prompts, completions of several lengths (all full: no padding)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    p_ids = torch.randint(0, 8192, (n, prompt_len), device="cuda", generator=g)
    c_ids = torch.randint(0, 8192, (n, new_tokens), device="cuda", generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[: n // 2, : prompt_len // 3] = 0 if padded else 1
    low = 1 if padded else new_tokens
    lengths = torch.randint(low, new_tokens + 1, (n,), device="cuda", generator=g)
    c_mask = (torch.arange(new_tokens, device="cuda")[None] < lengths[:, None]).long()
    return p_ids, p_mask, c_ids, c_mask


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, ent = completion_logprobs(model, *batch, backend="triton")
    mask = batch[3].float()
    loss = -(logp * mask).sum() / mask.sum() - 0.01 * (ent * mask).sum() / mask.sum()
    loss.backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_update_matches_eager_and_new_lengths_reuse_the_compiled_code(tmp_path):
    torch.manual_seed(0)
    net, tok = load_policy("tiny-llama", SMALL_LLAMA)
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    eager, compiled = _policy(tmp_path / "m"), _policy(tmp_path / "m")
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(compiled) == 4
    # the last batch has no padding at all (prompts of one length, every completion at the limit: a model that
    # never stops), which transformers runs without an attention mask unless the update adds a padding column
    shapes = [(32, 24, 48, True), (32, 17, 64, True), (24, 31, 40, True), (32, 24, 128, True), (32, 24, 64, False)]
    for seed, (n, p, c, padded) in enumerate(shapes):
        batch = _rollout(n, p, c, seed, padded)
        le, ge = _loss_and_grads(eager, batch)
        lc, gc = _loss_and_grads(compiled, batch)
        mask = batch[3].bool()
        gap = (lc - le)[mask].abs().max().item()
        assert gap < 2e-2, f"shape {(n, p, c, padded)}: log-prob gap {gap:.3g} between compiled and eager layers"
        rel = max(((gc[k] - ge[k]).norm() / ge[k].norm().clamp(min=1e-12)).item() for k in ge)
        assert rel < 3e-2, f"shape {(n, p, c, padded)}: relative gradient difference {rel:.3g}"
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs for {len(shapes)} rollout shapes: {graphs}; recompiles: {dict(counters['recompiles'])}")
    assert graphs <= 2, f"{graphs} graphs for {len(shapes)} shapes: new lengths recompile the layer"


def test_compiled_lora_update_matches_eager_in_one_graph_for_all_lengths(tmp_path):
    """LoRA adapters (peft, all linear layers) inside compiled decoder layers: same log-probs and adapter gradients
    as the eager layers, and at most two graphs for all rollout shapes (padded or not; no recompile per length, no
    graph break)."""
    from lightning_rl.lora import apply_lora

    torch.manual_seed(0)
    net, tok = load_policy("tiny-llama", SMALL_LLAMA)
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")

    def lora_policy():
        torch.manual_seed(1)  # the same adapters in both copies
        model = apply_lora(load_policy(str(tmp_path / "m"))[0], {"r": 8, "lora_alpha": 16}).cuda().train()
        with torch.no_grad():  # lora_B starts at zero: give it values so that lora_A's gradients are not zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        enable_activation_checkpointing(model)
        return model

    eager, compiled = lora_policy(), lora_policy()
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(compiled) == 4
    shapes = [(32, 24, 48, True), (32, 17, 64, True), (24, 31, 40, True), (32, 24, 64, False)]
    for seed, (n, p, c, padded) in enumerate(shapes):
        batch = _rollout(n, p, c, seed, padded)
        le, ge = _loss_and_grads(eager, batch)
        lc, gc = _loss_and_grads(compiled, batch)
        assert all("lora_" in k for k in ge) and len(ge) == 4 * 7 * 2  # only the adapters train
        gap = (lc - le)[batch[3].bool()].abs().max().item()
        assert gap < 2e-2, f"shape {(n, p, c, padded)}: log-prob gap {gap:.3g} between compiled and eager layers"
        rel = max(((gc[k] - ge[k]).norm() / ge[k].norm().clamp(min=1e-12)).item() for k in ge)
        assert rel < 3e-2, f"shape {(n, p, c, padded)}: relative adapter-gradient difference {rel:.3g}"
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    print(f"compiled LoRA graphs for {len(shapes)} rollout shapes: {graphs}; graph breaks: {breaks}")
    assert graphs <= 2 and breaks == 0, f"{graphs} graphs, {breaks} graph breaks for {len(shapes)} shapes"


def test_offloaded_checkpoints_lower_the_updates_peak_with_the_same_gradients(tmp_path):
    """``enable_activation_checkpointing(offload=True)`` with the compiled layers: the checkpointed layers' inputs
    wait in pinned host memory, so the update's peak drops by about (layers - 2) of them (the first, hook-based
    offload kept every activation there: 359 -> 1839 MiB); the gradients stay and the layers compile whole."""
    torch.manual_seed(0)
    config = {**SMALL_LLAMA, "num_hidden_layers": 12}
    net, tok = load_policy("tiny-llama", config)
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    batch = _rollout(32, 64, 448, seed=3)  # 16k tokens: each layer's fp32 input is 16 MiB
    from helpers import node_counting_backend

    peaks, grads, graphs, regions, unique = {}, {}, {}, {}, {}
    for offload in (False, True):
        torch._dynamo.reset()
        counters.clear()
        nodes, regions[offload] = [], []
        model, _ = load_policy(str(tmp_path / "m"))
        model = model.cuda().train()
        enable_activation_checkpointing(model, offload=offload)
        compile_decoder_layers(model, backend=node_counting_backend("inductor", nodes, regions[offload]))
        _loss_and_grads(model, batch)  # compile and warm the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, grads[offload] = _loss_and_grads(model, batch)
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        graphs[offload] = (nodes, sum(counters["graph_break"].values()))
        unique[offload] = counters["stats"]["unique_graphs"]
        if not offload:  # the same pass again: how far two backward passes differ without any offload
            _, grads["again"] = _loss_and_grads(model, batch)
        del model
    layer_input = 32 * (64 + 448) * config["hidden_size"] * 4
    print(f"offloaded checkpoints: update peak {peaks[False] / 2**20:.0f} -> {peaks[True] / 2**20:.0f} MiB "
          f"(a layer's input {layer_input / 2**20:.0f} MiB)")
    assert peaks[False] - peaks[True] >= 0.7 * (config["num_hidden_layers"] - 2) * layer_input
    # offloaded, the layer's math compiles without autograd (the forward) and with it (the recompute), whole layers
    # without a break (transformers' offload, inside the forward, left dynamo a stub at most)
    print(f"offloaded checkpoints: (graph node counts, graph breaks) {graphs[False]} without, {graphs[True]} with; "
          f"checkpointed regions in each graph {regions[False]} without, {regions[True]} with")
    assert all(breaks == 0 and len(nodes) >= 1 and min(nodes) > 50 for nodes, breaks in graphs.values()), graphs
    # both passes of an offloaded layer run compiled, the checkpoint's forward (gradients off) and the recompute,
    # wherever transformers checkpoints (in __call__ up to 5.22, and there the forward ran eagerly until 2026-12-05)
    print(f"offloaded checkpoints: compiled graphs {unique[False]} without, {unique[True]} with")
    assert unique[True] == 2, unique
    # the offload's checkpoint is the library's own, outside every graph ([0, 0] on an H200, 2026-12-04; torch 2.11
    # ran the plain path's checkpoint outside the graphs too)
    assert not any(regions[True]), regions
    # the offload moves tensors, not math; what differs between two backward passes is the order of CUDA's atomic
    # adds (the embedding's and attention's backward), which bf16 autocast rounds into differences of a few 1e-3
    # (5.4e-3 measured on an H200 for the worst tensor). A stale or wrong layer input would be off by order 1.
    def relative(other):
        return {k: ((other[k] - g).norm() / g.norm().clamp(min=1e-12)).item() for k, g in grads[False].items()}

    rel, noise = relative(grads[True]), relative(grads["again"])
    worst = max(rel, key=rel.get)
    print(f"offloaded checkpoints: largest relative gradient difference {rel[worst]:.2g} ({worst}); two passes "
          f"without offload differ by up to {max(noise.values()):.2g}")
    assert rel[worst] < 2e-2, f"{worst}: relative gradient difference {rel[worst]:.3g} with offloaded checkpoints"
