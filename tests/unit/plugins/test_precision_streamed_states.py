"""MemoryAwarePrecision(optimizer_states="cpu"): chunked optimizer steps and the plan's arithmetic, without a fit (CPU).

Its fits are in tests/integration/plugins/test_precision_streamed_states_fit.py.
"""

import pytest
import torch
from helpers import bit_equal
from torch import nn

from lightning_rl import MemoryAwarePrecision
from lightning_rl.plugins import (
    MemoryAwareFSDPPrecision,
    ModelMemory,
    RolloutNeeds,
    StreamedOptimizerStates,
    UnsupportedOptimizerError,
    plan_memory,
)
from lightning_rl.plugins.memory_plan import GiB, MemoryPlanError


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 1), nn.Linear(1, 1))


def _backward(net, step):
    torch.manual_seed(100 + step)
    net(torch.randn(8, 16)).pow(2).mean().backward()
    net[4].weight.grad = None  # never has a gradient: no state, never stepped
    if step % 2:
        net[2].bias.grad = None  # sometimes has none: skipped on those steps


def _assert_same_steps(plain, streamed, opt_a, opt_b, *where):
    """Bit-equal parameters, the same parameters with states, and bit-equal (or equal) state values."""
    for a, b in zip(plain.parameters(), streamed.parameters(), strict=True):
        assert bit_equal(a, b), where
        assert (a in opt_a.state) == (b in opt_b.state), where
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), where
        for k in sa:
            assert bit_equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], (*where, k)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, foreach=True),
    "adamw-two-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-2, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_streamed_steps_are_bit_identical_to_plain_steps(name):
    plain, streamed = _net(), _net()
    opt_a = OPTIMIZERS[name](list(plain.parameters()))
    opt_b = OPTIMIZERS[name](list(streamed.parameters()))
    streamer = StreamedOptimizerStates(chunk_bytes=1024)  # a few parameters per chunk
    for step in range(4):
        for net in (plain, streamed):
            _backward(net, step)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        streamer.step(opt_b)
        assert all(p.grad is None for p in streamed.parameters())  # freed chunk by chunk
        opt_b.zero_grad(set_to_none=True)  # what the module does next: harmless
        assert streamer.last_chunks > 1
    _assert_same_steps(plain, streamed, opt_a, opt_b, name)
    pb = list(streamed.parameters())
    assert not opt_b.state.get(pb[-2])  # the parameter that never had a gradient has no state
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]


def test_first_step_creates_states_chunk_by_chunk_and_keeps_step_counters():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    streamer = StreamedOptimizerStates(chunk_bytes=8 * (32 + 256))  # the second and third parameters' states
    _backward(net, 0)
    chunks = streamer.chunks(opt, [p for p in net.parameters() if p.grad is not None])
    # estimated at two fp32 moments per parameter before any state; the first weight is a chunk on its own
    assert [len(c) for c in chunks] == [1, 2, 4]
    streamer.step(opt)
    assert streamer.last_chunks == 3 and streamer.last_peak_chunk_bytes == 8 * 32 * 16
    params = list(net.parameters())
    for p in params[:-2] + params[-1:]:
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert state["step"].dim() == 0 and state["step"].device.type == "cpu" and float(state["step"]) == 1.0
    assert params[-2] not in opt.state  # no gradient, no state
    assert streamer.states_on_device_bytes([opt]) == 0  # CPU training: the states are home already
    assert [len(c) for c in streamer.chunks(opt, params[:-2])] == [1, 2, 3]  # now from the states themselves
    assert streamer.device_bytes_estimate(opt, total_state_bytes=10**9) == 8 * 32 * 16  # the largest parameter
    assert streamer.device_bytes_estimate(opt, total_state_bytes=100) == 100


def test_grads_kept_with_free_grads_off_and_restored_after_an_error():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _backward(net, 0)
    grads = {p: p.grad.clone() for p in net.parameters() if p.grad is not None}
    StreamedOptimizerStates(chunk_bytes=64, free_grads=False).step(opt)
    assert all(torch.equal(p.grad, g) for p, g in grads.items())
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        opt.step()

    with pytest.raises(RuntimeError, match="boom"):
        StreamedOptimizerStates(chunk_bytes=1).step(opt, step_fn=failing_step)
    first = next(iter(grads))
    assert first.grad is None  # stepped and freed before the error
    assert all(torch.equal(p.grad, g) for p, g in grads.items() if p is not first)


def test_unsupported_optimizers_are_refused_naming_the_option():
    net = _net()
    with pytest.raises(UnsupportedOptimizerError, match="optimizer_states='device'"):
        StreamedOptimizerStates().step(torch.optim.LBFGS(net.parameters()))

    class GlobalState(torch.optim.SGD):
        def step(self, closure=None):
            self.state["shared"] = {"count": torch.zeros(2)}
            return super().step(closure)

    opt = GlobalState(net.parameters(), lr=0.1)
    _backward(net, 0)
    with pytest.raises(UnsupportedOptimizerError, match="does not belong to one parameter"):
        StreamedOptimizerStates(chunk_bytes=64).step(opt)
    with pytest.raises(ValueError, match="optimizer_states"):
        MemoryAwarePrecision(optimizer_states="gpu")
    with pytest.raises(ValueError, match="cpu_offload"):
        MemoryAwareFSDPPrecision(optimizer_states="cpu")


# ----------------------------------------------------------------------------- one large parameter in slices
def _wide(seed=0):
    """An embedding of 300 rows (its AdamW states, 19 KB, are the largest by far) feeding a small head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 5))


def _wide_backward(net, step):
    x = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(step))
    net(x).pow(2).mean().backward()


SLICEABLE = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=1e-2),  # no state at all
}


@pytest.mark.parametrize("name", list(SLICEABLE))
def test_a_parameter_larger_than_a_chunk_steps_in_slices_bit_identically(name):
    plain, sliced = _wide(), _wide()
    opt_a = SLICEABLE[name](list(plain.parameters()))
    opt_b = SLICEABLE[name](list(sliced.parameters()))
    streamer = StreamedOptimizerStates(chunk_bytes=2048, split_large=True)  # 2 KB: 32 of the 300 rows a slice
    storage = sliced[0].weight.data_ptr()
    for step in range(3):
        for net in (plain, sliced):
            _wide_backward(net, step)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        streamer.step(opt_b)
        assert all(p.grad is None for p in sliced.parameters())
        _assert_same_steps(plain, sliced, opt_a, opt_b, name, step)
        assert sliced[0].weight.shape == (300, 8) and sliced[0].weight.data_ptr() == storage  # its own storage
        # one slice of states at a time on the device: at most a chunk, where the whole would be 19.2 KB (before
        # the first step the slices assume AdamW's two moments: amsgrad's third makes them half as large again)
        assert streamer.last_peak_chunk_bytes <= (2048 if step else 3072)
        assert (streamer.last_peak_chunk_bytes > 0) is (name != "sgd-plain")
    if name == "sgd-plain":
        return
    assert streamer.device_bytes_estimate(opt_b, total_state_bytes=10**9) <= 2048
    whole = StreamedOptimizerStates(chunk_bytes=2048)  # without split_large the embedding is one chunk
    assert whole.device_bytes_estimate(opt_b, total_state_bytes=10**9) == sum(
        t.numel() * t.element_size() for t in opt_b.state[sliced[0].weight].values() if t.dim())


def test_an_error_in_a_slice_gives_the_parameter_back_its_gradient_and_states():
    net = _wide()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    streamer = StreamedOptimizerStates(chunk_bytes=2048, split_large=True)
    _wide_backward(net, 0)
    streamer.step(opt)  # states exist now
    _wide_backward(net, 1)
    weight = net[0].weight
    grad = weight.grad.clone()
    states = {k: v.clone() for k, v in opt.state[weight].items()}
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:  # the embedding's second slice
            raise RuntimeError("boom")
        opt.step()

    with pytest.raises(RuntimeError, match="boom"):
        streamer.step(opt, step_fn=failing_step)
    assert weight.shape == (300, 8) and torch.equal(weight.grad, grad)
    assert opt.state[weight].keys() == states.keys()
    assert all(torch.equal(opt.state[weight][k], v) for k, v in states.items() if v.dim() == 0)  # the counter
    assert all(opt.state[weight][k].shape == (300, 8) for k, v in states.items() if v.dim())


@pytest.mark.parametrize("scale", [None, 0.25], ids=["no-clip", "clipped"])
def test_an_embedding_with_its_master_in_host_memory_steps_in_slices_as_it_would_whole(scale):
    from helpers import host_master_stepping

    runs = []
    for split in (False, True):
        net = _wide()
        masters, opt, streamer = host_master_stepping(net, lr=1e-2, chunk_bytes=2048, split_large=split)
        weight = net[0].weight
        storage = weight.data_ptr()
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 weights: the model runs under autocast
                _wide_backward(net, step)
            masters.grad_scale = None if scale is None else torch.tensor(scale)
            streamer.step(opt)
            assert weight.dtype == torch.bfloat16 and weight.shape == (300, 8) and weight.data_ptr() == storage
            assert torch.equal(weight, masters.master(weight).to(torch.bfloat16))  # the rounded master
            # a slice's master and fp32 gradient beside its states: half the rows of a slice without a master
            assert streamer.last_peak_chunk_bytes <= (2048 if split and step else (3072 if split else 10**9))
        if split:
            assert streamer._slice_rows(opt, [weight], {weight: torch.zeros_like(weight)}) == 16
        runs.append((masters.master(weight).clone(), {k: v.clone() for k, v in opt.state[weight].items()}))
    (whole, whole_states), (sliced, sliced_states) = runs
    assert torch.equal(whole, sliced)
    assert all(torch.equal(whole_states[k], sliced_states[k]) for k in whole_states)


def test_only_elementwise_optimizers_and_unmanaged_parameters_are_sliced():
    net = _wide()
    _wide_backward(net, 0)
    grads = {p: p.grad for p in net.parameters()}
    streamer = StreamedOptimizerStates(chunk_bytes=2048, split_large=True)
    weight = net[0].weight
    assert streamer._slice_rows(torch.optim.AdamW(net.parameters()), [weight], grads) == 32  # 300 rows * 2048 // 19200
    assert streamer._slice_rows(torch.optim.Adagrad(net.parameters()), [weight], grads) == 0
    assert StreamedOptimizerStates(chunk_bytes=2048)._slice_rows(torch.optim.AdamW(net.parameters()), [weight],
                                                                  grads) == 0
    assert streamer._slice_rows(torch.optim.AdamW(net.parameters()), [net[1].weight], grads) == 0  # small


# ----------------------------------------------------------------------------- plan arithmetic
def test_plan_counts_one_streamed_chunk_of_states_and_none_during_rollout():
    model = ModelMemory(500_000_000, 2 * 10**9, 0, 0)  # 0.5B full fine-tune: 2 GB weights, 2 GB grads, 4 GB Adam
    rollout = RolloutNeeds(kv_bytes_per_token=12288, tokens=1024, overhead_bytes=GiB, offload_optimizer=False)
    budget = 8 * 10**9 + 40 * 10**6
    kw = dict(budget_bytes=budget, model=model, activation_bytes_per_token=100_000, sequence_tokens=512,
              reserved_bytes=0, rollout=rollout)
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(**kw)  # 2 + 2 + 4 GB leave 40 MB, less than one sequence (51 MB)
    assert "optimizer_states='cpu'" in str(err.value)
    chunk = 64 * 1024**2
    plan = plan_memory(optimizer_device_bytes=chunk, **kw)
    assert plan.train_parts["optimizer states (streamed from CPU, one chunk)"] == chunk
    assert "optimizer states" not in plan.train_parts
    assert plan.rollout_parts["optimizer states"] == 0
    free = budget - 4 * 10**9 - chunk
    assert plan.micro_batch_tokens == (free // 100_000) // 512 * 512
    assert "streamed from CPU" in plan.summary()
    small = plan_memory(optimizer_bytes=1000, optimizer_device_bytes=chunk, **kw)
    assert small.train_parts["optimizer states (streamed from CPU, one chunk)"] == 1000  # never more than all


# ----------------------------------------------------------------------------- copies on side streams
def test_overlapped_copies_plan_two_more_chunks_and_change_nothing_on_a_cpu():
    plain, streamed = _net(), _net()
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(streamed.parameters(), lr=1e-2)
    streamer = StreamedOptimizerStates(chunk_bytes=1024, overlap_copies=True)
    for step in range(3):
        _backward(plain, step)
        _backward(streamed, step)
        opt_a.step()
        opt_a.zero_grad()
        streamer.step(opt_b)  # no CUDA: the copies stay on the caller's side, as without the option
    _assert_same_steps(plain, streamed, opt_a, opt_b)
    serial = StreamedOptimizerStates(chunk_bytes=1024)
    one = serial.device_bytes_estimate(opt_b, total_state_bytes=10**9)
    params = [p for p in streamed.parameters() if p in opt_b.state]
    second = sorted(serial._state_bytes(opt_b, p) for p in params)[-2]
    # the largest parameter's states step while two chunks (at most the second largest's) are in flight
    assert streamer.device_bytes_estimate(opt_b, total_state_bytes=10**9) == one + 2 * max(1024, second)
    assert streamer.device_bytes_estimate(opt_b, total_state_bytes=100) == 100
    assert MemoryAwarePrecision(optimizer_states="cpu", overlap_state_copies=True)._streamer.overlap_copies
    assert not MemoryAwarePrecision(optimizer_states="cpu")._streamer.overlap_copies


@pytest.mark.parametrize("capturable", [False, True], ids=["plain", "capturable"])
def test_a_checkpoint_load_puts_streamed_states_in_host_memory_and_counters_beside_their_parameters(capturable):
    """A resumed fit's optimizer load with streamed states: the moments land in host memory in fp32, never on the
    device (where ``load_state_dict`` and Lightning put all of them at once), the counters of a capturable group
    beside their parameters, and the parameters keep their own data. The meta device stands in for the GPU."""
    saved_net = nn.Linear(4, 3)
    saved_opt = torch.optim.AdamW(saved_net.parameters(), lr=1e-2)
    saved_net(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    for group in saved["param_groups"]:  # as saved by a capturable run on the GPU (the load takes the saved settings)
        group["capturable"] = capturable
    net = nn.Linear(4, 3, device="meta")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, capturable=capturable)
    plugin = MemoryAwarePrecision(optimizer_states="cpu")
    plain = torch.optim.AdamW(nn.Linear(4, 3, device="meta").parameters(), lr=1e-2, capturable=capturable)
    plain.load_state_dict(saved)
    assert all(s["exp_avg"].is_meta for s in plain.state.values())  # torch's own load: on the parameters' device
    plugin.load_streamed_optimizer_state(optimizer, saved)
    assert net.weight.is_meta and net.weight.shape == (3, 4) and net.bias.shape == (3,)
    for p, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].device.type == "cpu" and state[key].dtype == torch.float32 and state[key].shape == p.shape
            assert torch.equal(state[key], saved["state"][0 if p is net.weight else 1][key])
        assert state["step"].is_meta is capturable
        if not capturable:
            assert float(state["step"]) == 1
    assert plugin._streamer.states_on_device_bytes([optimizer]) == 0
