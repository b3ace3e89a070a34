"""The host masters' optimizer step run by the CPU: the same AdamW steps as the step streamed through the device."""

import pytest
import torch
from helpers import host_master_stepping, small_lm, small_lm_backward
from torch import nn

from lightning_rl import MemoryAwarePrecision
from lightning_rl.plugins.host_gradients import HostGradients
from lightning_rl.plugins.host_step import (
    AUTO_SHARE_BOUNDS,
    AUTO_SHARE_START,
    HostStep,
    balanced_share,
    chunks_by_size,
    host_share,
    host_step_refusal,
)


def _setup(on_host: bool, chunk_bytes=2048):
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=chunk_bytes, split_large=True)
    held = HostGradients()
    held.attach(masters.parameters())
    streamer.gradients = held
    streamer.host_step = on_host
    plugin = MemoryAwarePrecision(master_weights="cpu")
    plugin._masters, plugin._host_grads = masters, held
    return net, masters, opt, streamer, plugin, held


def _snapshot(net, masters, opt):
    weights = {n: (masters.master(p) if masters.manages(p) else p).clone() for n, p in net.named_parameters()}
    states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    return weights, states


@pytest.mark.parametrize("share", [True, 0.5, "auto"], ids=["all-on-host", "half-on-host", "auto-share"])
@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clipped"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_host_step_matches_the_streamed_step(micro_batches, clip, share):
    """Three steps with one or two backwards each: masters and moments as the streamed step's (PyTorch's fused CPU
    kernel against its plain one), the bf16 weights their rounded masters, the step counters where they were. With
    half on the host, the other half streams through the step at the same time."""
    runs = []
    for on_host in (False, share):
        net, masters, opt, streamer, plugin, held = _setup(on_host)
        for step in range(3):
            for part in range(micro_batches):
                small_lm_backward(net, step, part)
            if clip is not None:
                plugin.clip_grad_by_norm(opt, clip)
                assert float(masters.grad_scale) < 1
            streamer.step(opt)
            assert held.held() == [] and all(p.grad is None for p in net.parameters())
            assert masters.grad_scale is None
            for p in masters.parameters():  # the device copy is the master rounded, as the streamed step writes it
                assert p.dtype == torch.bfloat16
                torch.testing.assert_close(p.data, masters.master(p).to(torch.bfloat16), rtol=0, atol=0)
        assert all(g.get("fused") is None and g.get("foreach") is None for g in opt.param_groups)  # put back
        counters = [v for st in opt.state.values() for v in st.values() if v.dim() == 0]
        assert counters and all(v.device.type == "cpu" and float(v) == 3 for v in counters)
        runs.append(_snapshot(net, masters, opt))
    (weights_a, states_a), (weights_b, states_b) = runs
    moved = 0
    for name, w in weights_a.items():
        start = dict(small_lm().named_parameters())[name]
        # two kernels (fused and plain) whose roundings differ with the CPU's vector width: an AVX-512 host moved one
        # element of a clipped step's weights by 1.4e-5 after three steps, against the 3e-2 of a step gone wrong
        torch.testing.assert_close(weights_b[name], w, rtol=1e-5, atol=1e-4, msg=name)
        moved += int((w - start).abs().max() > 1e-3)
    assert moved == len(weights_a)  # every parameter trained
    for name, a in states_a.items():
        assert a.keys() == states_b[name].keys()
        for k in a:
            torch.testing.assert_close(states_b[name][k], a[k], rtol=1e-5, atol=1e-7, msg=f"{name} {k}")


def test_a_share_steps_the_largest_weights_on_the_host_and_streams_the_rest():
    """``host_step=0.5``: the embedding and the first layer (2,592 of 9,792 elements, largest first while they fit
    in half) step on the host; the head's 7,200 stream with the biases."""
    net, masters, opt, streamer, _, _ = _setup(0.5)
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    small_lm_backward(net, 0)
    streamer.step(opt)
    assert streamer._host_scratch.numel() == 2400 + 192
    assert streamer.last_chunks > len(streamer.chunks(opt, biases))
    assert all(p.grad is None for p in net.parameters())
    for p in masters.parameters():
        torch.testing.assert_close(p.data, masters.master(p).to(torch.bfloat16), rtol=0, atol=0)


def test_host_share_takes_the_largest_parameters_that_fit():
    ps = [nn.Parameter(torch.zeros(n)) for n in (10, 40, 30, 20)]
    ids = {id(p): p.numel() for p in ps}
    assert sorted(ids[i] for i in host_share(ps, 0.5)) == [10, 40]  # 40 fits in 50, 30 does not, then 10
    assert host_share(ps, 1.0) == set(ids) and host_share(ps, True) == set(ids)
    assert host_share(ps, 0.0) == set()


def test_step_hooks_run_when_every_chunk_steps_on_the_host():
    """A model without biases: nothing streams, and the optimizer's step (its hooks, an LR scheduler's count) still
    runs once per step, with no gradient visible to it."""
    net = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 300, bias=False))
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048)
    held = HostGradients()
    held.attach(masters.parameters())
    streamer.gradients, streamer.host_step = held, True
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([p.grad is None for p in net.parameters()]))
    before = {id(p): masters.master(p).clone() for p in masters.parameters()}
    small_lm_backward(net, 0)
    streamer.step(opt)
    assert streamer.last_chunks == 0 and seen == [[True, True]]
    assert all(not torch.equal(masters.master(p), before[id(p)]) for p in masters.parameters())


def test_only_the_biases_stream_through_the_step():
    """With the host step the streamed chunks hold the biases only; without it every parameter makes a chunk."""
    net, masters, opt, streamer, _, _ = _setup(True)
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    small_lm_backward(net, 0)
    streamer.step(opt)
    assert streamer.last_chunks == len(streamer.chunks(opt, biases)) >= 1
    assert streamer.last_step_seconds > 0  # timed, for the benchmark's step records
    streamer.host_step = False
    small_lm_backward(net, 1)
    streamer.step(opt)
    assert streamer.last_chunks > len(streamer.chunks(opt, biases))
    for p in masters.parameters():
        torch.testing.assert_close(p.data, masters.master(p).to(torch.bfloat16), rtol=0, atol=0)


def test_an_optimizer_without_a_fused_cpu_kernel_streams_instead():
    """SGD has no fused CPU kernel: the streamer steps it through the device path, with the same result as there."""
    results = []
    for on_host in (False, True):
        net = small_lm()
        masters, _, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        masters.watch_optimizer(opt)
        held = HostGradients()
        held.attach(masters.parameters())
        streamer.gradients, streamer.host_step = held, on_host
        for step in range(2):
            small_lm_backward(net, step)
            streamer.step(opt)
        results.append({n: masters.master(p).clone() for n, p in net.named_parameters() if masters.manages(p)})
    for name, w in results[0].items():
        torch.testing.assert_close(results[1][name], w, rtol=0, atol=0, msg=name)
    assert "SGD" in host_step_refusal(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ValueError, match="cannot run on the host: SGD"):
        HostStep(opt, [], masters, held)


def test_refusals_name_the_setting():
    p = nn.Parameter(torch.zeros(2))
    assert host_step_refusal(torch.optim.AdamW([p], lr=0.1)) is None
    assert "capturable=True" in host_step_refusal(torch.optim.Adam([p], lr=0.1, capturable=True))
    assert "differentiable=True" in host_step_refusal(torch.optim.AdamW([p], lr=0.1, differentiable=True))
    assert "not torch.optim.Adam or AdamW" in host_step_refusal(torch.optim.RMSprop([p], lr=0.1))


def test_the_plugin_refuses_step_on_host_with_an_optimizer_it_cannot_step():
    net = small_lm()
    plugin = MemoryAwarePrecision(master_weights="cpu", step_on_host=True)
    plugin._optimizers = [torch.optim.SGD(net.parameters(), lr=0.1)]
    with pytest.raises(ValueError, match=r"step_on_host=True.*SGD.*use step_on_host=False"):
        plugin._attach_host_masters(net, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in net.parameters())  # refused before anything moved


def test_an_error_in_the_step_leaves_the_unstepped_gradients_held(monkeypatch):
    """The first chunk steps, the second raises: its weights and masters stay as they were, its gradients wait in
    host memory for a retry, and the retry steps it like an uninterrupted step."""
    net, masters, opt, streamer, _, held = _setup(True)
    ref_net, ref_masters, ref_opt, ref_streamer, _, _ = _setup(True)
    for n in (net, ref_net):
        small_lm_backward(n, 0)
    ref_streamer.step(ref_opt)
    params = masters.parameters()
    before = {id(p): masters.master(p).clone() for p in params}
    calls = []
    step = torch.optim.AdamW.step

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return step(self, *args, **kwargs)

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="boom"):
        m.setattr(torch.optim.AdamW, "step", failing)
        HostStep(opt, params, masters, held, chunk_numel=params[0].numel()).step_now()
    assert len(calls) == 2
    first, rest = params[0], params[1:]
    assert not held.holds(first) and all(held.holds(p) for p in rest)
    for p in rest:
        torch.testing.assert_close(masters.master(p), before[id(p)], rtol=0, atol=0)
        assert p.grad is None and p.dtype == torch.bfloat16
    HostStep(opt, rest, masters, held).step_now()
    for p, q in zip(params, ref_masters.parameters(), strict=True):
        torch.testing.assert_close(masters.master(p), ref_masters.master(q), rtol=0, atol=0)


def test_chunks_by_size_keep_the_order_and_put_a_large_parameter_alone():
    ps = [nn.Parameter(torch.zeros(n)) for n in (3, 4, 10, 2, 2)]
    assert [[p.numel() for p in c] for c in chunks_by_size(ps, 8)] == [[3, 4], [10], [2, 2]]


def test_the_scratch_buffer_is_kept_from_step_to_step():
    """The fp32 gradients' buffer (hundreds of MB for a real model) is made once, not page-faulted in every step."""
    net, masters, opt, streamer, _, _ = _setup(True)
    ptrs = []
    for step in range(2):
        small_lm_backward(net, step)
        streamer.step(opt)
        ptrs.append(streamer._host_scratch.data_ptr())
    assert ptrs[0] == ptrs[1]
    assert streamer._host_scratch.numel() == sum(p.numel() for p in masters.parameters())  # one chunk: all of them


def test_a_run_resumed_from_a_checkpoint_steps_on_as_one_that_never_stopped():
    """Two host steps, the model's and optimizer's state dicts saved and loaded into a fresh set-up, a third step:
    the same masters and moments as three steps in one go."""
    whole = _setup(True)
    for step in range(3):
        small_lm_backward(whole[0], step)
        whole[3].step(whole[2])
    first = _setup(True)
    for step in range(2):
        small_lm_backward(first[0], step)
        first[3].step(first[2])
    model_state = {k: v.clone() for k, v in first[0].state_dict().items()}
    optimizer_state = first[2].state_dict()
    resumed = _setup(True)
    resumed[0].load_state_dict(model_state)
    resumed[2].load_state_dict(optimizer_state)
    small_lm_backward(resumed[0], 2)
    resumed[3].step(resumed[2])
    weights_a, states_a = _snapshot(whole[0], whole[1], whole[2])
    weights_b, states_b = _snapshot(resumed[0], resumed[1], resumed[2])
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, rtol=0, atol=0, msg=name)
        for k, v in states_a[name].items():
            torch.testing.assert_close(states_b[name][k], v, rtol=0, atol=0, msg=f"{name} {k}")


def test_the_plugins_checkpoint_keeps_the_balanced_share_of_the_cpu():
    """A resumed run starts from the share the saving run had balanced to (0.5 on every fresh start): the same
    weights step on the CPU as in the run that never stopped."""
    plugin = MemoryAwarePrecision(optimizer_states="cpu")
    plugin._streamer.host_share = 0.23
    state = plugin.state_dict()
    assert state["host_share"] == 0.23
    resumed = MemoryAwarePrecision(optimizer_states="cpu")
    resumed.load_state_dict(state)
    assert resumed._streamer.host_share == 0.23
    fixed = MemoryAwarePrecision(optimizer_states="cpu", step_on_host=0.5)  # a share the user set stays as set
    assert fixed.state_dict()["host_share"] is None
    fixed.load_state_dict(state)
    assert fixed._streamer.host_share != 0.23 and fixed._streamer.host_step == 0.5
    MemoryAwarePrecision().load_state_dict(state)  # nothing streams (yet): nothing to restore


@pytest.mark.parametrize("bad", [1.5, -0.1, "yes", [0.5]])
def test_the_plugin_refuses_a_share_outside_zero_to_one(bad):
    with pytest.raises(ValueError, match="step_on_host"):
        MemoryAwarePrecision(step_on_host=bad)
    assert MemoryAwarePrecision(step_on_host=0.5).step_on_host == 0.5
    assert MemoryAwarePrecision(step_on_host="auto").step_on_host == "auto"


def test_balanced_share_moves_halfway_to_equal_finish_times():
    # the CPU steps 2x as many elements per second as the device: they end together at 2/3; halfway from 0.5
    assert balanced_share(0.5, (100, 1.0), (100, 2.0)) == pytest.approx((0.5 + 2 / 3) / 2)
    assert balanced_share(0.3, (30, 1.0), (70, 1.0)) == pytest.approx((0.3 + 0.3) / 2)  # balanced: stays
    assert balanced_share(0.9, (100, 1.0), (100, 1e3)) == AUTO_SHARE_BOUNDS[1]  # a slow link: the CPU takes most
    assert balanced_share(0.1, (100, 1e3), (100, 1.0)) == AUTO_SHARE_BOUNDS[0]
    assert balanced_share(0.4, (0, 0.0), (100, 1.0)) == 0.4  # nothing measured on one side: unchanged


def test_the_auto_share_follows_the_measured_step():
    """``host_step="auto"``: each step moves the share from the last step's times, within its bounds."""
    net, masters, opt, streamer, _, _ = _setup("auto")
    shares = []
    for step in range(3):
        small_lm_backward(net, step)
        streamer.step(opt)
        shares.append(streamer.host_share)
    assert all(AUTO_SHARE_BOUNDS[0] <= x <= AUTO_SHARE_BOUNDS[1] for x in shares)
    assert shares[0] != AUTO_SHARE_START  # timed and moved after the first step


def test_an_error_on_the_host_thread_reaches_the_caller_after_the_streamed_half_stepped(monkeypatch):
    """``host_step=0.5``: the CPU's thread fails on its first chunk while the head streams. The error reaches the
    caller; the head stepped, the CPU's weights did not and their gradients still wait; a retry steps them as one
    uninterrupted step does."""
    import threading

    net, masters, opt, streamer, _, held = _setup(0.5)
    ref_net, ref_masters, ref_opt, ref_streamer, _, _ = _setup(0.5)
    for n in (net, ref_net):
        small_lm_backward(n, 0)
    ref_streamer.step(ref_opt)
    before = {n: masters.master(p).clone() for n, p in net.named_parameters() if masters.manages(p)}
    step = torch.optim.AdamW.step

    def failing_on_a_thread(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("host boom")
        return step(self, *args, **kwargs)

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="host boom"):
        m.setattr(torch.optim.AdamW, "step", failing_on_a_thread)
        streamer.step(opt)
    named = dict(net.named_parameters())
    assert not torch.equal(masters.master(named["3.weight"]), before["3.weight"])  # the head streamed
    for name in ("0.weight", "1.weight"):  # the CPU's share: untouched, still held
        torch.testing.assert_close(masters.master(named[name]), before[name], rtol=0, atol=0)
        assert held.holds(named[name]) and named[name].grad is None
    streamer.step(opt)  # the retry: only the held gradients step
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        if masters.manages(p):  # a step of fewer tensors may round its last elements apart (1.5e-8 on AVX-512)
            torch.testing.assert_close(masters.master(p), ref_masters.master(q), rtol=1e-6, atol=1e-7, msg=name)


def test_weights_that_move_between_the_host_and_the_streamed_side_step_on_alike():
    """An automatic share moves weights between the sides from step to step: states made on the host stream later,
    streamed states step on the host later, and the updates stay those of the streamed step."""
    ref, ref_masters, ref_opt, ref_streamer, _, _ = _setup(False)
    net, masters, opt, streamer, _, _ = _setup(True)
    for step, share in enumerate((True, False, 0.5, True, 0.2)):
        streamer.host_step = share
        for n in (ref, net):
            small_lm_backward(n, step)
        ref_streamer.step(ref_opt)
        streamer.step(opt)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        mine, theirs = (masters.master(p), ref_masters.master(q)) if masters.manages(p) else (p, q)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
        for k, v in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
            assert opt.state[p][k].device == v.device


@pytest.mark.parametrize("setting", [{"master_weights": "device"}, {"optimizer_states": "device"},
                                     {"gradients_to_host": False}], ids=["device-masters", "device-states", "no-host"])
def test_the_plugin_refuses_step_on_host_where_it_would_step_nothing(setting):
    with pytest.raises(ValueError, match=r"step_on_host='auto' steps host masters .* it would step nothing"):
        MemoryAwarePrecision(step_on_host="auto", **setting)
    MemoryAwarePrecision(step_on_host=False, **setting)  # fine without it
    assert MemoryAwarePrecision(**setting).step_on_host is False  # the default steps nothing there, quietly


def test_the_default_step_on_host_is_auto_where_it_applies_and_refuses_nothing():
    assert MemoryAwarePrecision().step_on_host == "auto"
    net = small_lm()
    plugin = MemoryAwarePrecision(master_weights="cpu")
    plugin._optimizers = [torch.optim.SGD(net.parameters(), lr=0.1)]
    plugin._attach_host_masters(net, torch.device("cpu"))  # an optimizer it cannot step: streamed, not refused
    assert plugin.host_master_weights is not None


def test_a_fit_whose_step_on_host_has_nothing_to_step_says_so(saved_tiny_llama, caplog):
    import logging

    from helpers import make_trainer, tiny_grpo

    from lightning_rl import PromptDataModule

    caplog.set_level(logging.WARNING, logger="lightning_rl.plugins")
    plugin = MemoryAwarePrecision(master_weights="cpu", step_on_host=True)  # on a CPU no gradient goes to the host
    make_trainer(max_steps=1, plugins=[plugin]).fit(tiny_grpo(saved_tiny_llama(1)),
                                                     PromptDataModule(train_data=[{"prompt": "ab"}], batch_size=1))
    assert any("steps nothing in this fit" in r.getMessage() and "training on cpu" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    quiet = MemoryAwarePrecision(master_weights="cpu")  # the default on a CPU: nothing to step, nothing said
    make_trainer(max_steps=1, plugins=[quiet]).fit(tiny_grpo(saved_tiny_llama(1)),
                                                    PromptDataModule(train_data=[{"prompt": "ab"}], batch_size=1))
    assert quiet.step_on_host == "auto" and quiet.resolved_master_weights == "cpu"  # host masters, CPU gradients
    assert not any("steps nothing" in r.getMessage() for r in caplog.records)
