"""fp32 masters in host memory, compute-dtype weights on the device: the same updates as fp32 masters under autocast."""

import copy

import pytest
import torch
from helpers import host_master_stepping
from torch import nn

from lightning_rl import MemoryAwarePrecision
from lightning_rl.models import load_policy
from lightning_rl.plugins.host_masters import (
    HostMasterWeights,
    managed_parameters,
    managed_weights,
    step_counters_beside_their_parameters,
)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 11))


def _loss(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float().log_softmax(-1).mean().neg()


def _pair(chunk_bytes=200):
    """An fp32-master model with its AdamW, and the same model with host masters streamed chunk by chunk."""
    ref = _net()
    net = copy.deepcopy(ref)
    masters, opt, streamer = host_master_stepping(net, lr=3e-2, chunk_bytes=chunk_bytes)
    return ref, torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.1), net, opt, masters, streamer


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clipped"])
def test_updates_are_bit_identical_to_fp32_masters_under_autocast(clip):
    """Without clipping the linear weights' updates are bit-identical; the embedding's gradient is rounded to bf16."""
    ref, ref_opt, net, opt, masters, streamer = _pair()
    assert [type(m).__name__ for m, _, _ in managed_weights(_net())] == ["Embedding", "Linear", "Linear"]
    own = {id(p): p.data_ptr() for p in net.parameters()}
    plugin = MemoryAwarePrecision(master_weights="cpu")
    plugin._masters = masters
    for step in range(4):
        x = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(step))
        _loss(ref, x).backward()
        _loss(net, x).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            plugin.clip_grad_by_norm(opt, clip)
            assert masters.grad_scale is not None and float(masters.grad_scale) < 1  # the clip took effect
        ref_opt.step()
        ref_opt.zero_grad()
        streamer.step(opt)
        assert streamer.last_chunks > 1  # the masters really travelled chunk by chunk
        for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
            if not masters.manages(b):  # biases stay fp32 on the device
                assert name.endswith("bias") and b.dtype == torch.float32, (step, name)
                torch.testing.assert_close(b, a, rtol=0, atol=0 if clip is None else 2e-3)
                continue
            assert b.dtype == torch.bfloat16, (step, name)
            # the embedding's gradient adds up in bf16, so its update is close; with clipping, so is the norm and
            # with it every update
            if name == "0.weight" or clip is not None:
                torch.testing.assert_close(masters.master(b), a, rtol=0, atol=2e-3)
                continue
            assert torch.equal(masters.master(b), a), (step, name)
            assert torch.equal(b, a.to(torch.bfloat16)), (step, name)  # what the matmul reads, as autocast's cast
    assert {id(p): p.data_ptr() for p in net.parameters()} == own  # an engine process mapping them keeps reading them
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 and not v.is_cuda for v in state.values())
    masters.detach()
    for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
        assert b.dtype == torch.float32  # after the fit the module holds fp32 weights again
        assert name == "0.weight" or clip is not None or torch.equal(a, b)


def test_state_dicts_hold_the_fp32_masters_and_loading_fills_them():
    ref, ref_opt, net, opt, masters, streamer = _pair()
    x = torch.randint(0, 11, (3, 5))
    for model, step in ((ref, ref_opt.step), (net, lambda: streamer.step(opt))):
        _loss(model, x).backward()
        step()
    saved = net.state_dict()
    assert saved["1.weight"].dtype == torch.float32 and torch.equal(saved["1.weight"], ref[1].weight)
    optimizer_saved = copy.deepcopy(opt.state_dict())

    other, other_masters = _net(seed=5), HostMasterWeights(torch.bfloat16)
    other_masters.attach(other)
    other.load_state_dict(saved)
    assert torch.equal(other_masters.master(other[1].weight), ref[1].weight)
    assert torch.equal(other[1].weight, ref[1].weight.to(torch.bfloat16))
    other_opt = torch.optim.AdamW(other.parameters(), lr=3e-2, weight_decay=0.1)
    other_masters.watch_optimizer(other_opt)
    other_opt.load_state_dict(optimizer_saved)
    assert other[1].weight.dtype == torch.bfloat16  # the masters stood in only while loading
    assert other_opt.state[other[1].weight]["exp_avg"].dtype == torch.float32  # not cast to the parameter's bf16
    assert torch.equal(other_opt.state[other[1].weight]["exp_avg"], ref_opt.state[ref[1].weight]["exp_avg"])


def test_a_fused_groups_step_counters_go_back_beside_their_parameters_after_a_load():
    """``load_state_dict`` puts a fused group's counters on the device of the host master it saw (a resumed fit's
    first CUDA step then failed); they move to the parameter's device. The meta device stands in for the GPU."""
    fused, plain = nn.Parameter(torch.zeros(2, device="meta")), nn.Parameter(torch.zeros(2, device="meta"))
    optimizer = type("Loaded", (), {})()
    optimizer.param_groups = [{"params": [fused], "fused": True}, {"params": [plain], "fused": None}]
    optimizer.state = {fused: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)},
                       plain: {"step": torch.tensor(3.0)}}
    assert step_counters_beside_their_parameters(optimizer) == 1
    assert optimizer.state[fused]["step"].is_meta  # the moments are the streamer's to place
    assert not optimizer.state[fused]["exp_avg"].is_meta and not optimizer.state[plain]["step"].is_meta
    assert step_counters_beside_their_parameters(optimizer) == 0


def test_the_plugins_checkpoint_load_gives_host_master_weights_fp32_states_in_host_memory():
    """The load that takes over a resumed fit's (``load_streamed_optimizer_state``) with host masters: the compute-
    dtype weights stay as they are and their states load in fp32, the masters' dtype, as the uninterrupted run's."""
    plugin, module = _shrunk()
    optimizer = plugin._optimizers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.net(torch.randint(0, 11, (3, 5))).float().sum()
    loss.backward()
    plugin._streamer.step(optimizer)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed, other = _shrunk()
    weights = {n: p.detach().clone() for n, p in other.named_parameters()}
    resumed.load_streamed_optimizer_state(resumed._optimizers[0], saved)
    loaded = resumed._optimizers[0]
    assert loaded.param_groups[0]["params"] == list(other.parameters())
    assert {n: p.dtype for n, p in other.named_parameters()} == {n: p.dtype for n, p in module.named_parameters()}
    assert all(torch.equal(p, weights[n]) for n, p in other.named_parameters())
    for (_, a), (_, b) in zip(module.named_parameters(), other.named_parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded.state[b][key].dtype == torch.float32 and not loaded.state[b][key].is_meta
            assert torch.equal(loaded.state[b][key], optimizer.state[a][key])


def test_an_error_mid_step_leaves_weights_and_masters_as_they_were():
    _, _, net, opt, masters, streamer = _pair(chunk_bytes=1)  # a chunk per parameter
    _loss(net, torch.randint(0, 11, (3, 5))).backward()
    before = {id(p): p.detach().clone() for p in net.parameters()}
    before_masters = {id(p): masters.master(p).clone() for p in net.parameters() if masters.manages(p)}
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        opt.step()

    with pytest.raises(RuntimeError, match="boom"):
        streamer.step(opt, step_fn=failing_step)
    assert not masters.swapped()
    for p in net.parameters():
        assert torch.equal(p, before[id(p)]) and p.grad is not None  # its gradient is back for a retry
        if masters.manages(p):
            assert p.dtype == torch.bfloat16 and torch.equal(masters.master(p), before_masters[id(p)])


def test_a_tied_embedding_has_one_master_that_both_names_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_policy("tiny-llama", {"num_hidden_layers": 1, "tie_word_embeddings": True})
    model.float()
    names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter under its first name
    managed = [names[id(p)] for p in managed_parameters(model)]
    assert "model.embed_tokens.weight" in managed and all(
        n == "model.embed_tokens.weight" or (".layers." in n and n.endswith("proj.weight")) for n in managed)
    assert sum(m is model.lm_head for m, _, _ in managed_weights(model)) == 1  # the LM head holds it too
    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(model)
    emb = model.model.embed_tokens.weight
    assert emb is model.lm_head.weight and emb.dtype == torch.bfloat16
    with torch.no_grad():
        masters.master(emb).add_(1e-3)  # a value bf16 cannot hold: the checkpoint must carry the master
    state = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert state[key].dtype == torch.float32 and torch.equal(state[key], masters.master(emb))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, masters.master(emb))
    untied, _ = load_policy("tiny-llama", {"num_hidden_layers": 1, "tie_word_embeddings": False})
    untied.float()
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {
        n for n, p in untied.named_parameters() if any(p is q for q in managed_parameters(untied))}


def test_host_masters_need_their_states_streamed():
    with pytest.raises(ValueError, match="optimizer_states='auto' or 'cpu'"):
        MemoryAwarePrecision(master_weights="cpu", optimizer_states="device")
    with pytest.raises(ValueError, match="master_weights must be"):
        MemoryAwarePrecision(master_weights="gpu")
    with pytest.raises(ValueError, match="16-bit"):
        HostMasterWeights(torch.float32)


def test_lora_adapters_keep_their_fp32_weights_on_the_device():
    from lightning_rl.lora import apply_lora

    model, _ = load_policy("tiny-llama", {"num_hidden_layers": 1})
    model = apply_lora(model.float(), {"r": 4})
    assert managed_weights(model) == []  # the base is frozen, the adapters are tiny and go to the engine as is


def test_an_optimizer_that_cannot_step_in_chunks_is_refused_naming_master_weights():
    from types import SimpleNamespace

    from lightning_rl.plugins.streamed_states import UnsupportedOptimizerError

    net = _net()
    plugin = MemoryAwarePrecision(master_weights="cpu")
    plugin._optimizers = [torch.optim.LBFGS(net.parameters())]
    net._trainer = SimpleNamespace(world_size=1)
    with pytest.raises(UnsupportedOptimizerError, match="master_weights='device'"):
        plugin._attach_host_masters(net, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in net.parameters())  # nothing converted before the refusal


class _Engine:
    """A rollout engine that generates during the update (its own process) with 1 GiB beside it, or sleeps."""

    def __init__(self, beside=2**30):
        self.beside = beside

    def rollout_memory(self, shape):
        from lightning_rl.plugins.rollout_memory import RolloutMemory

        return RolloutMemory(engine_weight_bytes=2**30, beside_training_bytes=self.beside)


class _Policy(nn.Module):
    """A generating module: its shape says it has rollouts, it offloads nothing."""

    def __init__(self, world_size=1):
        super().__init__()
        from types import SimpleNamespace

        self.net = _net()
        self._trainer = SimpleNamespace(world_size=world_size)

    def training_shape(self):
        from types import SimpleNamespace

        return SimpleNamespace(generates=True)

    def apply_micro_batch_plan(self, micro_batch_tokens):
        pass


def _shrunk(world_size=1, beside=2**30, **kw):
    plugin = MemoryAwarePrecision(step_chunk_bytes=100, **kw)
    plugin.register_rollout(_Engine(beside))
    module = _Policy(world_size)
    opt = torch.optim.AdamW(module.parameters())
    plugin._optimizers = [opt]
    if plugin.master_weights == "cpu":
        plugin._attach_host_masters(module, torch.device("cuda"))  # what connect does before the shrink
    plugin.shrink_beside_engine(module, [opt], torch.device("cuda"))
    return plugin, module


def _linear_dtypes(module):
    return {p.dtype for _, _, p in [(None, None, m.weight) for m in module.modules() if isinstance(m, nn.Linear)]}


@pytest.mark.parametrize(("kw", "world_size", "beside", "masters"), [
    ({}, 1, 2**30, True),                              # the default beside an engine process: masters on the host
    ({}, 1, 0, False),                                 # the engine sleeps during the update: nothing streams
    ({}, 2, 2**30, False),                             # several processes: host masters support one only
    ({"optimizer_states": "device"}, 1, 2**30, False),  # the user keeps the states, so the masters, on the device
    ({"master_weights": "device"}, 1, 2**30, False),   # the user's choice stands
    ({"optimizer_states": "cpu"}, 1, 2**30, True),     # states the user streams carry the masters too
], ids=["auto", "engine-sleeps", "two-processes", "states-on-device", "device", "states-cpu"])
def test_auto_master_weights_follow_the_states_streamed_beside_the_engine(kw, world_size, beside, masters):
    plugin, module = _shrunk(world_size, beside, **kw)
    assert (plugin.host_master_weights is not None) is masters
    assert _linear_dtypes(module) == ({torch.bfloat16} if masters else {torch.float32})
    assert module.net[0].weight.dtype == (torch.bfloat16 if masters else torch.float32)  # the embedding with them


def test_auto_masters_too_large_to_hide_behind_the_generation_stay_on_the_device(monkeypatch, caplog):
    import lightning_rl.plugins.host_residency as host_residency

    managed = 4 * sum(p.numel() for p in managed_parameters(_Policy()))
    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", managed - 1)
    with caplog.at_level("INFO", logger="lightning_rl.plugins"):
        plugin, module = _shrunk()
    assert plugin.host_master_weights is None and plugin.streams_optimizer_states  # the states still stream
    assert _linear_dtypes(module) == {torch.float32}
    assert "master_weights='cpu' moves them" in caplog.text
    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", managed)
    plugin, module = _shrunk()
    assert plugin.host_master_weights is not None  # at the limit they move
    plugin, module = _shrunk(master_weights="cpu")  # the user's choice stands whatever the size
    assert plugin.host_master_weights is not None


@pytest.mark.parametrize("master_weights", ["auto", "cpu"])
def test_an_engine_that_leaves_the_update_takes_auto_masters_back_but_not_the_users(master_weights):
    plugin, module = _shrunk(master_weights=master_weights)
    before = {n: plugin.host_master_weights.master(p).clone() for n, p in module.named_parameters()
              if plugin.host_master_weights.manages(p)}
    plugin.engine_leaves_the_update(module)  # the engine process failed to start: between updates now
    if master_weights == "auto":
        assert plugin.host_master_weights is None and not plugin.streams_optimizer_states
        assert _linear_dtypes(module) == {torch.float32}
        params = dict(module.named_parameters())
        assert all(torch.equal(params[n], m) for n, m in before.items())  # the fp32 values, not their bf16 rounding
    else:
        assert plugin.host_master_weights is not None and plugin.streams_optimizer_states
        assert _linear_dtypes(module) == {torch.bfloat16}


@pytest.mark.parametrize("send", [True, False], ids=["gradients-to-host", "gradients-on-device"])
def test_host_masters_on_cuda_empty_the_cache_and_send_gradients_to_host_memory_unless_told_not(monkeypatch, send):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    plugin, module = _shrunk(gradients_to_host=send)  # masters attached for a CUDA device (tensors on the CPU here)
    assert plugin.host_master_weights is not None
    assert emptied  # the fp32 weights the conversion freed go back to the driver
    held = plugin.host_gradients
    assert (held is not None and len(held) == len(plugin.host_master_weights)) is send
    plugin.teardown()
    assert plugin.host_gradients is None and plugin.host_master_weights is None


def test_a_fit_that_stops_between_backward_and_step_leaves_fp32_gradients_on_fp32_weights():
    plugin, module = _shrunk()  # host masters and gradients sent to host memory (a CUDA device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.net(torch.randint(0, 11, (3, 5))).float().sum()
    loss.backward()
    assert plugin.host_gradients.held()  # the backward sent them; no step followed
    plugin.teardown()
    for p in module.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize("send", [True, False], ids=["gradients-to-host", "gradients-on-device"])
def test_masters_too_large_to_move_still_send_their_fp32_gradients_to_host_memory(monkeypatch, send):
    import lightning_rl.plugins.host_residency as host_residency

    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", 0)  # every model's masters stay on the device
    plugin, module = _shrunk(gradients_to_host=send)
    assert plugin.host_master_weights is None and plugin.streams_optimizer_states
    held = plugin.host_gradients
    assert (held is not None and len(held) == len(list(module.parameters()))) is send
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.net(torch.randint(0, 11, (3, 5))).float().sum()
    loss.backward()
    if send:
        assert all(p.grad is None for p in module.parameters()) and len(held.held()) == len(held)
    plugin.engine_leaves_the_update(module)  # the engine process failed to start: its copies hide nothing now
    assert plugin.host_gradients is None and not plugin.streams_optimizer_states
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())  # given back
    plugin, module = _shrunk(gradients_to_host=send)
    plugin.teardown()
    assert plugin.host_gradients is None


def test_the_plan_counts_gradients_waiting_in_host_memory_at_their_largest_two(monkeypatch):
    from types import SimpleNamespace

    import lightning_rl.plugins.host_residency as host_residency
    import lightning_rl.plugins.precision_planning as precision_planning

    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", 0)
    plugin, module = _shrunk()  # fp32 parameters, their gradients sent to host memory
    seen = {}

    def fake_plan(shape, model, **kw):
        seen.update(kw)

    monkeypatch.setattr(precision_planning, "plan_for_shape", fake_plan)
    monkeypatch.setattr(precision_planning, "training_shape_of",
                        lambda m: SimpleNamespace(generates=False, extra_frozen=()))
    monkeypatch.setattr(precision_planning, "datamodule_batch_size", lambda trainer: 1)
    plugin.memory_budget = 2**30
    plugin.make_plan(module, plugin._optimizers, torch.device("cpu"))
    sizes = sorted(p.numel() * 4 for p in module.parameters())
    assert seen["grad_bytes"] == sum(sizes[-2:]) < sum(sizes)
    plugin.teardown()
    plugin.make_plan(module, plugin._optimizers, torch.device("cpu"))
    assert seen["grad_bytes"] is None  # no gradients held: one per trainable parameter


def test_several_training_processes_keep_their_fp32_gradients_on_the_device(monkeypatch):
    import lightning_rl.plugins.host_residency as host_residency

    monkeypatch.setattr(host_residency, "HOST_MASTERS_AUTO_MAX_BYTES", 0)
    plugin, _ = _shrunk(world_size=2)  # DDP's reducer reads every gradient where the backward left it
    assert plugin.streams_optimizer_states and plugin.host_gradients is None
