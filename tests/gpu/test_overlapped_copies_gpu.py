"""Streamed states whose copies overlap the step on side streams: the same updates, and how long the step takes."""

import copy
import time

import pytest
import torch
from helpers import tied_embedding_backward, tied_embedding_model
from torch import nn

from lightning_rl.plugins.host_masters import HostMasterWeights
from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model():
    """An embedding tied to the output (stepped in slices when asked) and eight wide layers (many chunks)."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)) for _ in range(8)]
    return tied_embedding_model(32768, 1024, nn.Sequential(*layers))


def _backward(model, step):
    tied_embedding_backward(model, step, tokens=128)


def _setup(model, host_masters, **streamer):
    masters = None
    if host_masters:
        masters = HostMasterWeights(torch.bfloat16)
        masters.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    s = StreamedOptimizerStates(chunk_bytes=32 * 2**20, **streamer)
    s.masters = masters
    return opt, s, masters


@pytest.mark.parametrize("host_masters", [False, True], ids=["states", "states+masters"])
@pytest.mark.parametrize("split_large", [False, True], ids=["whole", "sliced"])
def test_overlapped_copies_step_bit_identically_to_serial_copies(host_masters, split_large):
    ref = _model()
    net = copy.deepcopy(ref)
    ref_opt, serial, ref_masters = _setup(ref, host_masters, split_large=split_large)
    opt, overlapped, masters = _setup(net, host_masters, split_large=split_large, overlap_copies=True)
    own = [p.data_ptr() for p in net.parameters()]
    seconds = {"serial": [], "overlapped": []}
    for step in range(4):
        for model, o, s, name in ((ref, ref_opt, serial, "serial"), (net, opt, overlapped, "overlapped")):
            _backward(model, step)
            torch.cuda.synchronize()
            t = time.perf_counter()
            s.step(o)  # synchronizes before it returns
            seconds[name].append(time.perf_counter() - t)
        for (n, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b), (step, n)
            if masters is not None and masters.manages(b):
                assert torch.equal(ref_masters.master(a), masters.master(b)), (step, n)
        for a, b in zip(ref.parameters(), net.parameters(), strict=True):
            assert ref_opt.state[a].keys() == opt.state[b].keys()
            for k, v in ref_opt.state[a].items():
                w = opt.state[b][k]
                assert torch.equal(v, w), (step, k)
                assert w.dim() == 0 or (w.device.type == "cpu" and w.is_pinned())  # back in pinned host memory
            assert b.grad is None
    assert overlapped.last_chunks > 8
    assert [p.data_ptr() for p in net.parameters()] == own  # an engine process's mapping stays valid
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in seconds.items()}
    print(f"streamed step ({'host masters' if host_masters else 'states'}, {'sliced' if split_large else 'whole'}): "
          f"serial {med['serial'] * 1e3:.1f} ms, overlapped {med['overlapped'] * 1e3:.1f} ms")


def test_an_error_mid_step_with_copies_in_flight_gives_back_the_gradients_and_states():
    net = _model()
    opt, s, _ = _setup(net, True, overlap_copies=True)
    _backward(net, 0)
    s.step(opt)  # states exist now
    _backward(net, 1)
    grads = {id(p): p.grad.clone() for p in net.parameters()}
    calls = 0

    def failing():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        opt.step()

    with pytest.raises(RuntimeError, match="boom"):
        s.step(opt, step_fn=failing)
    unstepped = [p for p in net.parameters() if p.grad is not None]
    assert unstepped, "the chunks after the failing one keep their gradients"
    for p in unstepped:
        assert torch.equal(p.grad, grads[id(p)])
    assert all(p.dtype == torch.bfloat16 for p in net["mid"].parameters() if p.dim() == 2)  # masters swapped back
    for p in net.parameters():  # the next step runs, and takes the states the failure left on the device home
        p.grad = None
    _backward(net, 2)
    s.step(opt)
    for st in opt.state.values():
        for v in st.values():
            assert v.dim() == 0 or v.device.type == "cpu"
