"""fp32 masters in pinned host memory on a GPU: the same updates as fp32 masters under autocast, a lower peak."""

import copy

import pytest
import torch
from torch import nn

from lightning_rl.plugins.host_masters import HostMasterWeights
from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_pinned_masters_step_bit_identically_to_fp32_masters_with_asynchronous_copies():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1000)).cuda()
    net = copy.deepcopy(ref)
    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(net)
    assert all(masters.master(p).is_pinned() for p in net.parameters() if masters.manages(p))
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (net, ref))
    streamer = StreamedOptimizerStates(chunk_bytes=1 << 20)
    streamer.masters = masters
    own = [p.data_ptr() for p in net.parameters()]
    for step in range(3):
        x = torch.randint(0, 1000, (8, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for model in (ref, net):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x).float().log_softmax(-1).mean().neg().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        streamer.step(opt)
        for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
            if name == "0.weight":  # the embedding (managed too): its gradient adds up in bf16, so close
                assert b.dtype == torch.bfloat16
                torch.testing.assert_close(masters.master(b), a.cpu(), rtol=0, atol=1e-4)
            elif masters.manages(b):
                assert b.dtype == torch.bfloat16 and torch.equal(masters.master(b), a.cpu()), step
                assert torch.equal(b, a.to(torch.bfloat16)), step
            else:
                assert torch.equal(a, b), step
    assert [p.data_ptr() for p in net.parameters()] == own  # an engine process's mapping stays valid
    assert streamer.last_chunks > 1


def test_a_resumed_fused_optimizer_steps_on_as_the_uninterrupted_one():
    """A resumed fit: AdamW's fused CUDA kernel, its state loaded while the host masters stand in for the weights,
    steps on as the run that never stopped (its step counters back on the device, where the kernel reads them;
    they were left on the host and the first step after a resume failed)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1000)).cuda()

    def make():
        net, masters = copy.deepcopy(base), HostMasterWeights(torch.bfloat16)
        masters.attach(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        masters.watch_optimizer(opt)
        streamer = StreamedOptimizerStates(chunk_bytes=1 << 20)
        streamer.masters = masters
        return net, opt, masters, streamer

    def train(net, opt, streamer, steps):
        for step in steps:
            x = torch.randint(0, 1000, (8, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                net(x).float().log_softmax(-1).mean().neg().backward()
            streamer.step(opt)

    net, opt, masters, streamer = make()
    train(net, opt, streamer, range(2))
    model_state, optimizer_state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, opt, streamer, range(2, 4))
    r_net, r_opt, r_masters, r_streamer = make()
    r_net.load_state_dict(model_state)
    r_opt.load_state_dict(optimizer_state)
    assert all(state["step"].is_cuda and float(state["step"]) == 2 for state in r_opt.state.values())
    train(r_net, r_opt, r_streamer, range(2, 4))
    for (name, a), b in zip(net.named_parameters(), r_net.parameters(), strict=True):
        assert not torch.equal(b, model_state[name].to(b.device, b.dtype)), name  # it stepped (the saved: fp32)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
        if masters.manages(a):
            torch.testing.assert_close(r_masters.master(b), masters.master(a), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("host_masters", [False, True], ids=["fp32-weights", "host-masters"])
def test_a_resumed_fits_streamed_states_load_into_pinned_host_memory_never_the_device(host_masters):
    """The plugin's load of a resumed fit's optimizer state (it takes over Lightning's, which put every state on the
    device beside the rollout engine until the first step): the moments go to pinned host memory, the device
    allocates nothing for them, the fused kernel's counters are on the device, and the run steps on as the one that
    never stopped."""
    import io

    from lightning_rl import MemoryAwarePrecision

    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1000)).cuda()

    def train(net, step_fn, steps):
        for step in steps:
            x = torch.randint(0, 1000, (8, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                net(x).float().log_softmax(-1).mean().neg().backward()
            step_fn()

    def streamed():
        net = copy.deepcopy(base)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        plugin = MemoryAwarePrecision(optimizer_states="cpu", master_weights="cpu" if host_masters else "device",
                                      step_on_host=False)  # every step on the device: the same kernel both runs
        plugin._optimizers = [opt]
        if host_masters:
            plugin._attach_host_masters(net, torch.device("cuda"))
        return net, opt, plugin

    net, opt, plugin = streamed()
    train(net, lambda: plugin._streamer.step(opt), range(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    train(net, lambda: plugin._streamer.step(opt), range(2, 4))
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=False)  # a checkpoint read back from disk

    r_net, r_opt, r_plugin = streamed()
    r_net.load_state_dict(net.state_dict())  # any weights: only the optimizer's load is measured here
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    r_plugin.load_streamed_optimizer_state(r_opt, saved)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    moments = [v for s in r_opt.state.values() for k, v in s.items() if k != "step"]
    state_bytes = sum(v.numel() * v.element_size() for v in moments)
    print(f"load: {grown} bytes on the device for {state_bytes} bytes of states")
    assert state_bytes > 8 << 20 and grown < 1 << 20  # the counters only (and the allocator's rounding)
    assert all(v.device.type == "cpu" and v.is_pinned() and v.dtype == torch.float32 for v in moments)
    assert all(s["step"].is_cuda and float(s["step"]) == 2 for s in r_opt.state.values())

    r_net, r_opt, r_plugin = streamed()  # resumed from step 2 as the fit would: weights then optimizer state
    net, opt, plugin = streamed()
    train(net, lambda: plugin._streamer.step(opt), range(2))
    torch.save(opt.state_dict(), buffer := io.BytesIO())
    r_net.load_state_dict(net.state_dict())  # with host masters: the fp32 masters, which the load copies in
    buffer.seek(0)
    r_plugin.load_streamed_optimizer_state(r_opt, torch.load(buffer, map_location="cpu", weights_only=False))
    train(net, lambda: plugin._streamer.step(opt), range(2, 4))
    train(r_net, lambda: r_plugin._streamer.step(r_opt), range(2, 4))
    for (name, a), b in zip(net.named_parameters(), r_net.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_host_masters_lower_a_full_finetunes_peak_below_streamed_states(bench):
    from lightning_rl import MemoryAwarePrecision

    case = bench.CASES["smollm2-135m-shape full"]
    streamed = bench.measure(case, MemoryAwarePrecision(optimizer_states="cpu", master_weights="device"), steps=2)
    plugin = MemoryAwarePrecision(master_weights="cpu")
    host = bench.measure(case, plugin, steps=2)
    print(f"full FT SmolLM2-135M shape: states streamed {streamed['peak_bytes'] / 2**30:.2f} GiB "
          f"({streamed['seconds']:.1f} s), + host masters {host['peak_bytes'] / 2**30:.2f} GiB "
          f"({host['seconds']:.1f} s)")
    assert host["steps"] == streamed["steps"] == 2
    # the linear weights (about 0.4 GB of SmolLM2's 0.54 GB fp32) keep half their bytes, their gradients too, and
    # autocast casts none of them: at least 0.3 GiB lower
    assert streamed["peak_bytes"] - host["peak_bytes"] >= 0.3 * 2**30


def _two_backwards_peak(net, step):
    """Two micro-batches' backwards of ``net`` (the second adds the first's held gradient back): their peak bytes
    above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for part in range(2):
        seed = torch.Generator("cuda").manual_seed(10 * step + part)
        x = torch.randint(0, 1024, (2, 16), device="cuda", generator=seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x).float().log_softmax(-1).mean().neg().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_gradients_sent_to_host_memory_step_identically_and_lower_the_backwards_peak():
    from lightning_rl.plugins.host_gradients import HostGradients

    runs = {}
    for hold in (False, True):
        torch.manual_seed(0)
        # many parameters of 1M each and few tokens: the gradients (68 MiB in bf16) outweigh the activations
        net = nn.Sequential(nn.Embedding(1024, 1024), *[nn.Linear(1024, 1024, bias=False) for _ in range(32)],
                            nn.Linear(1024, 1024, bias=False)).cuda()
        masters = HostMasterWeights(torch.bfloat16)
        masters.attach(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        streamer = StreamedOptimizerStates(chunk_bytes=1 << 20, split_large=True)
        streamer.masters = masters
        if hold:
            held = HostGradients()
            held.attach(masters.parameters())
            streamer.gradients = held
        peaks = []
        for step in range(3):
            peaks.append(_two_backwards_peak(net, step))
            if hold:
                assert all(p.grad is None for p in masters.parameters())
                assert all(held.host_gradient(p).is_pinned() for p in held.held())
            streamer.step(opt)
        runs[hold] = ([masters.master(p).clone() for p in masters.parameters()], max(peaks))
    (kept, kept_peak), (sent, sent_peak) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(kept, sent, strict=True))
    grad_bytes = sum(p.numel() * 2 for p in masters.parameters())  # bf16 gradients
    print(f"backward peak above the weights: gradients kept {kept_peak / 2**20:.1f} MiB, sent to host memory "
          f"{sent_peak / 2**20:.1f} MiB (the gradients: {grad_bytes / 2**20:.1f} MiB)")
    assert kept_peak - sent_peak >= grad_bytes // 2


def test_attaching_masters_gives_the_freed_fp32_weights_back_to_the_driver():
    def weights():  # SmolLM2-135M's linear shapes, loaded on the CPU and moved over, as from_pretrained and .cuda()
        torch.manual_seed(0)
        shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
        return nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes).cuda()

    def slack(convert):
        net = weights()
        convert(net)
        torch.cuda.empty_cache()
        held = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        del net
        torch.cuda.empty_cache()
        return held

    def in_place(net):
        for p in net.parameters():
            p.data = p.data.to(torch.bfloat16)

    fp32 = sum(p.numel() * 4 for p in weights().parameters())
    torch.cuda.empty_cache()
    before, after = slack(in_place), slack(HostMasterWeights(torch.bfloat16).attach)
    print(f"cached but unused after the conversion, of {fp32 / 2**20:.0f} MiB fp32: each weight in place "
          f"{before / 2**20:.1f} MiB, freed before the copies {after / 2**20:.1f} MiB")
    # a few segments' tails stay (31.5 MiB of 405 on an H200, 2026-12-03), where converting each weight in place
    # left the fragmented segments holding most of the fp32 bytes (249.8 MiB)
    assert after < fp32 / 10 and after < before / 4


def test_fp32_gradients_sent_to_host_memory_step_as_kept_ones_clipped_and_lower_the_backwards_peak():
    """No host masters (masters too large to move beside the engine): the fp32 gradients wait in pinned host memory
    and come back with their chunk's states, scaled by the clipping factor there."""
    from lightning_rl import MemoryAwarePrecision
    from lightning_rl.plugins.host_gradients import HostGradients

    runs = {}
    for hold in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(1024, 1024), *[nn.Linear(1024, 1024, bias=False) for _ in range(32)],
                            nn.Linear(1024, 1024, bias=False)).cuda()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        streamer = StreamedOptimizerStates(chunk_bytes=1 << 20, split_large=True)
        plugin = MemoryAwarePrecision()
        if hold:
            held = HostGradients()
            held.attach(net.parameters())
            streamer.gradients = plugin._host_grads = held
        peaks = []
        for step in range(3):
            peaks.append(_two_backwards_peak(net, step))
            if hold:
                assert all(p.grad is None for p in net.parameters())
                assert all(held.host_gradient(p).is_pinned() for p in held.held())
            plugin.clip_grad_by_norm(opt, 1e-2)
            streamer.step(opt)
        runs[hold] = ([p.detach().clone() for p in net.parameters()], max(peaks))
    (kept, kept_peak), (sent, sent_peak) = runs[False], runs[True]
    for a, b in zip(kept, sent, strict=True):  # the factor's last bit may differ (norms summed in another order)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    grad_bytes = sum(p.numel() * 4 for p in net.parameters())  # fp32 gradients
    print(f"fp32 gradients: backward peak above the weights kept {kept_peak / 2**20:.1f} MiB, sent to host memory "
          f"{sent_peak / 2**20:.1f} MiB (the gradients: {grad_bytes / 2**20:.1f} MiB)")
    assert kept_peak - sent_peak >= grad_bytes // 2


def test_a_tied_heads_gradient_leaves_at_the_start_of_the_backward_with_the_same_held_sum(tmp_path):
    """Host masters and gradients sent to host memory, a tied LM head and embedding (vocabulary 49,152, as
    SmolLM2's): with the head's use handed off (the default) its part of the gradient leaves for host memory as the
    Triton kernel's backward makes it, so the layers' backward runs with that part less on the device (the peak
    drops by it where the layers' backward holds the peak); the held gradients are the
    same sums as when autograd held the part to the end, over two micro-batches."""
    from lightning_rl.early_gradients import set_gradient_sink
    from lightning_rl.logprobs import completion_logprobs
    from lightning_rl.models import enable_activation_checkpointing, load_policy
    from lightning_rl.plugins.host_gradients import HostGradients

    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    net, tok = load_policy("tiny-llama", config)
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    runs = {}
    for early in (False, True):
        model = load_policy(str(tmp_path / "m"))[0].cuda().train()
        enable_activation_checkpointing(model)
        tied = model.get_output_embeddings().weight
        assert tied is model.get_input_embeddings().weight
        masters = HostMasterWeights(torch.bfloat16)
        masters.attach(model)
        held = HostGradients()
        held.attach(masters.parameters())
        if not early:
            set_gradient_sink(tied, None)  # autograd holds the head's part until the embedding's arrives
        marks = []  # allocated bytes when the backward reaches the first decoder layer (every later layer done)

        def mark(module, args, out, marks=marks):
            hidden = out[0] if isinstance(out, tuple) else out
            if hidden.requires_grad:
                hidden.register_hook(lambda grad, marks=marks: marks.append(torch.cuda.memory_allocated()))

        handle = model.model.layers[0].register_forward_hook(mark)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for part in range(2):
            g = torch.Generator("cuda").manual_seed(part)
            p_ids = torch.randint(0, 49152, (8, 32), device="cuda", generator=g)
            c_ids = torch.randint(0, 49152, (8, 96), device="cuda", generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logp, ent = completion_logprobs(model, p_ids, torch.ones_like(p_ids), c_ids, torch.ones_like(c_ids),
                                                backend="triton")
            (-logp.mean() - 0.01 * ent.mean()).backward()
        torch.cuda.synchronize()
        handle.remove()
        assert all(p.grad is None for p in masters.parameters())
        assert marks  # the backward reached the first layer (once a micro-batch, or again in its recomputation)
        runs[early] = (torch.cuda.max_memory_allocated() - base, max(marks) - base,
                       {n: held.host_gradient(p).clone() for n, p in model.named_parameters() if held.holds(p)})
        held.detach()
        del model, masters, held
        torch.cuda.empty_cache()
    (late_peak, late_layers, late), (early_peak, early_layers, handed) = runs[False], runs[True]
    part_bytes = 49152 * 256 * 2  # the head's bf16 part
    print(f"tied head's gradient: at the first layer's backward {late_layers / 2**20:.1f} MiB held by autograd, "
          f"{early_layers / 2**20:.1f} MiB handed off; backward peaks {late_peak / 2**20:.1f} and "
          f"{early_peak / 2**20:.1f} MiB (the part: {part_bytes / 2**20:.1f} MiB)")
    assert late.keys() == handed.keys() and "model.embed_tokens.weight" in handed
    # the same additions in the same order (bit for bit in the CPU tests); here the attention's and the embedding's
    # backward add with CUDA atomics, so two passes differ in bf16's last bits anyway
    rel = {n: ((handed[n].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12)).item()
           for n, g in late.items()}
    worst = max(rel, key=rel.get)
    print(f"tied head's gradient: largest relative difference of a held gradient {rel[worst]:.2g} ({worst})")
    assert rel[worst] < 2e-2, (worst, rel[worst])
    assert late_layers - early_layers >= 0.8 * part_bytes  # held through every layer's backward, or gone
