"""Gradients sent to host memory by the backward: the same steps as gradients kept on their device."""

import pytest
import torch
from helpers import host_master_stepping, small_lm, small_lm_backward

from lightning_rl import MemoryAwarePrecision
from lightning_rl.plugins.host_gradients import HostGradients


def _setup(hold: bool):
    """A model with host masters streamed in 2 KB chunks (the embedding in slices); its gradients held or not."""
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048, split_large=True)
    plugin = MemoryAwarePrecision(master_weights="cpu")
    plugin._masters = masters
    held = None
    if hold:
        held = HostGradients()
        assert held.attach(masters.parameters()) == 3  # the embedding and the two linear weights
        streamer.gradients = held
        plugin._host_grads = held
    return net, masters, opt, streamer, plugin, held


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clipped"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_held_gradients_step_as_gradients_on_the_device(micro_batches, clip):
    """The embedding in slices, one or two backwards a step: identical weights, masters and states; with clipping
    the norm adds the held gradients' squares in another order, so the factor may differ in its last bit."""
    runs = []
    for hold in (False, True):
        net, masters, opt, streamer, plugin, held = _setup(hold)
        norms = []
        for step in range(3):
            for part in range(micro_batches):
                small_lm_backward(net, step, part)
            if hold:  # the managed gradients left the device as the backward produced them; the biases stayed
                assert all(p.grad is None for p in masters.parameters())
                assert len(held.held()) == 3 and all(p.grad is not None for n, p in net.named_parameters()
                                                     if n.endswith("bias"))
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.float()) for g in grads]
                + ([held.squares().sqrt()] if hold else [])))))
            if clip is not None:
                plugin.clip_grad_by_norm(opt, clip)
                assert masters.grad_scale is not None and float(masters.grad_scale) < 1  # the clip took effect
                norms.append(float(masters.grad_scale))  # the factor counts the held gradients too
            streamer.step(opt)
            assert all(p.grad is None for p in net.parameters())
            if hold:
                assert held.held() == [] and held.squares() is None  # stepped: nothing held any more
        runs.append((norms, {n: (masters.master(p) if masters.manages(p) else p).clone()
                             for n, p in net.named_parameters()},
                     [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]))
    (norms_a, weights_a, states_a), (norms_b, weights_b, states_b) = runs
    assert norms_a == pytest.approx(norms_b, rel=1e-6)
    tol = {} if clip is None else {"rtol": 1e-5, "atol": 1e-6}
    for name, w in weights_a.items():
        torch.testing.assert_close(w, weights_b[name], **(tol or {"rtol": 0, "atol": 0}), msg=name)
    for a, b in zip(states_a, states_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], **(tol or {"rtol": 0, "atol": 0}))


def test_a_skipped_step_drops_the_held_gradients():
    net, masters, opt, streamer, plugin, held = _setup(hold=True)
    ref, ref_masters, ref_opt, ref_streamer, _, _ = _setup(hold=False)
    small_lm_backward(net, 0)  # a step that will be skipped (a NaN loss, say)
    assert held.held()
    opt.zero_grad(set_to_none=True)
    held.drop()
    for model, streamer_ in ((net, streamer), (ref, ref_streamer)):
        small_lm_backward(model, 1)
        streamer_.step(opt if model is net else ref_opt)
    for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
        want = ref_masters.master(a) if ref_masters.manages(a) else a
        got = masters.master(b) if masters.manages(b) else b
        assert torch.equal(want, got), name  # the skipped step's gradients were not added in


def test_an_error_mid_step_keeps_the_unstepped_gradients_held_for_a_retry():
    net, masters, opt, streamer, plugin, held = _setup(hold=True)
    ref, ref_masters, ref_opt, ref_streamer, _, _ = _setup(hold=False)
    small_lm_backward(net, 0)
    small_lm_backward(ref, 0)
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 20:  # after the embedding's 19 slices (16 of its 300 rows each): the next chunk
            raise RuntimeError("boom")
        opt.step()

    with pytest.raises(RuntimeError, match="boom"):
        streamer.step(opt, step_fn=failing_step)
    assert not held.holds(net[0].weight)  # stepped before the error
    assert held.held() and all(p.grad is None for p in held.held())  # the others still wait in host memory
    streamer.step(opt)  # the retry steps what the error left
    ref_streamer.step(ref_opt)
    assert not held.held()
    for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
        want = ref_masters.master(a) if ref_masters.manages(a) else a
        got = masters.master(b) if masters.manages(b) else b
        assert torch.equal(want, got), name


def test_detach_gives_held_gradients_back_and_stops_moving_them():
    net, masters, opt, streamer, plugin, held = _setup(hold=True)
    ref = _setup(hold=False)[0]
    for model in (net, ref):
        small_lm_backward(model, 0)
    expected = {n: p.grad for n, p in ref.named_parameters()}
    assert all(expected[n] is not None for n in expected)
    held.detach()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, expected[n]), n
    small_lm_backward(net, 1)
    assert all(p.grad is not None for p in net.parameters()) and not held.held()


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clipped"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_held_gradients_of_fp32_parameters_step_as_gradients_on_the_device(micro_batches, clip):
    """No host masters (fp32 parameters whose states stream): every gradient waits in host memory, the embedding
    steps in slices, and a clipped step scales the held gradients as they come back."""
    from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

    runs = []
    for hold in (False, True):
        net = small_lm()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.1)
        streamer = StreamedOptimizerStates(chunk_bytes=2048, split_large=True)
        plugin = MemoryAwarePrecision()
        held = None
        if hold:
            held = HostGradients()
            assert held.attach(net.parameters()) == 5  # the embedding, two weights and two biases
            streamer.gradients = plugin._host_grads = held
        sources = []
        for step in range(3):
            for part in range(micro_batches):
                small_lm_backward(net, step, part)
            if hold:
                assert all(p.grad is None for p in net.parameters()) and len(held.held()) == 5
                sources = [held.host_gradient(p).clone() for p in net.parameters()]
            if clip is not None:
                plugin.clip_grad_by_norm(opt, clip)
                if hold:
                    assert held.grad_scale is not None and float(held.grad_scale) < 1
                    assert all(torch.equal(held.host_gradient(p), s)  # scaled on the way back, not in the buffer
                               for p, s in zip(net.parameters(), sources, strict=True))
            streamer.step(opt)
            assert all(p.grad is None for p in net.parameters())
            if hold:
                assert held.held() == [] and held.grad_scale is None
        runs.append(({n: p.detach().clone() for n, p in net.named_parameters()},
                     [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]))
    (weights_a, states_a), (weights_b, states_b) = runs
    tol = {"rtol": 0, "atol": 0} if clip is None else {"rtol": 1e-5, "atol": 1e-6}
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, **tol, msg=name)
    for a, b in zip(states_a, states_b, strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], **tol)


def test_the_plan_counts_gradients_sent_to_host_memory_as_the_two_largest_in_flight():
    net = small_lm()
    held = HostGradients()
    held.attach([net[0].weight, net[1].weight, net[3].weight])  # not the biases
    sizes = {n: p.numel() * 4 for n, p in net.named_parameters()}
    kept = sizes["1.bias"] + sizes["3.bias"]
    two_largest = sum(sorted([sizes["0.weight"], sizes["1.weight"], sizes["3.weight"]])[-2:])
    assert held.device_bytes(net.parameters()) == kept + two_largest
    assert held.device_bytes(net.parameters()) < sum(sizes.values())
