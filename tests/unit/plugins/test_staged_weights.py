"""Host masters whose stepped weights wait in host buffers until a flush: the parameters keep the values an engine
generates from, and after the flush hold exactly what the step without staging writes."""

import pytest
import torch
from helpers import host_master_stepping, small_lm, small_lm_backward

from lightning_rl.plugins.host_gradients import HostGradients


def _run(staged: bool, ways: str, steps: int = 3):
    """Three AdamW steps of :func:`small_lm` with host masters, stepped ``ways`` (streamed in chunks, in row slices,
    on the host, or half on the host beside the other half streamed); with ``staged`` every managed weight waits
    for a flush after each step."""
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048, split_large=ways == "slices")
    if ways in ("host", "half"):
        held = HostGradients()
        held.attach(masters.parameters())
        streamer.gradients, streamer.host_step = held, True if ways == "host" else 0.5
    staging = masters.stage(masters.parameters()) if staged else None
    seen = []
    for step in range(steps):
        before = {id(p): p.detach().clone() for p in masters.parameters()}
        small_lm_backward(net, step)
        streamer.step(opt)
        if staging is not None:
            assert {id(p) for p in staging.waiting} == {id(p) for p in masters.parameters()}
            # the parameters still hold the values of before the step; the buffers the masters rounded
            for p in masters.parameters():
                assert torch.equal(p.data, before[id(p)])
                assert torch.equal(staging.buffer(p), masters.master(p).to(torch.bfloat16))
            assert masters.flush_staged() == sum(2 * p.numel() for p in masters.parameters())
            assert staging.waiting == [] and masters.flush_staged() == 0
        seen.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return seen, masters, net, opt


@pytest.mark.parametrize("ways", ["chunks", "slices", "host", "half"])
def test_staged_weights_wait_for_the_flush_then_match_the_unstaged_step(ways):
    plain, _, _, _ = _run(False, ways)
    staged, masters, _, _ = _run(True, ways)
    for step, (a, b) in enumerate(zip(plain, staged, strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), (ways, step, name)
    assert len(masters) == 3


def test_unstage_copies_what_waits_and_later_steps_write_the_parameters():
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048)
    masters.stage(masters.parameters())
    small_lm_backward(net, 0)
    streamer.step(opt)
    head = net[3].weight
    assert not torch.equal(head.data, masters.master(head).to(torch.bfloat16))  # waiting
    assert masters.unstage() > 0 and masters.staging is None
    assert torch.equal(head.data, masters.master(head).to(torch.bfloat16))
    small_lm_backward(net, 1)
    streamer.step(opt)  # no staging: straight into the parameter
    assert torch.equal(head.data, masters.master(head).to(torch.bfloat16))


def test_staging_refuses_what_would_lose_or_misplace_values():
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048)
    bias = net[1].bias
    with pytest.raises(ValueError, match="no host master"):
        masters.stage([bias])
    masters.stage(masters.parameters())
    with pytest.raises(ValueError, match="staged already"):
        masters.stage(masters.parameters())
    state = net.state_dict()
    with pytest.raises(RuntimeError, match="share_trained_weights.*before the engine starts"):
        net.load_state_dict(state)  # it would write the engine's weights under it
    small_lm_backward(net, 0)
    masters.swap_in([net[3].weight])
    with pytest.raises(RuntimeError, match="during an optimizer step"):
        masters.flush_staged()
    masters.swap_out([net[3].weight], keep=False)
    masters.detach()  # the end of a fit: fp32 masters back into the parameters, nothing waits
    assert masters.staging is None and net[3].weight.dtype == torch.float32


def test_a_step_that_fails_mid_parameter_flushes_only_the_rows_it_stepped():
    """Row slices of the head step until the optimizer fails: the stepped rows wait, the others keep their values
    through the flush (the buffers start as the parameters)."""
    net = small_lm()
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=2048, split_large=True)
    masters.stage(masters.parameters())
    head = net[3].weight
    before = head.detach().clone()
    small_lm_backward(net, 0)
    head_slices, step = [0], opt.step

    def failing(*args, **kwargs):
        if head.grad is not None:  # a slice of the head steps now
            head_slices[0] += 1
            if head_slices[0] == 3:  # two slices went by
                raise RuntimeError("injected")
        return step(*args, **kwargs)

    opt.step = failing
    with pytest.raises(RuntimeError, match="injected"):
        streamer.step(opt)
    assert any(p is head for p in masters.staging.waiting)
    masters.flush_staged()
    changed = (head.detach() != before).any(dim=1)
    assert 0 < int(changed.sum()) < head.shape[0]  # some rows stepped, the rest as they were
    assert torch.equal(head.detach()[~changed], before[~changed])
