"""A fully fine-tuned policy whose bf16 weights are the engine process's own, run in this process on a CPU.

``VLLMProcessEngine``'s calls go to a ``PolicyWeightReceiver`` holding a vLLM-shaped fake model (packed q/k/v and
gate/up, padded vocabulary rows), and CUDA IPC is replaced by handing the same tensors over. The policy is loaded
from a folder as users load it and its linear weights and embeddings get host masters, as ``MemoryAwarePrecision``
gives them. What is checked: the trainer's weights become rows of the engine's, an optimizer step leaves the
engine's weights as they were until the next sync, which copies the rounded masters in and loads only the rest, a
forward between the two is refused, and shutting down gives the trainer private weights with the latest values.
"""

import functools
from types import SimpleNamespace

import pytest
import torch
from cpu_engine_process import attach_worker
from helpers import host_master_stepping
from test_merged_base_protocol import _HANDED, LoadingFakeModel, _engine_rows, _hand_over

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout import vllm_process
from lightning_rl.rollout.shared_trained_weights import (
    StaleSharedWeightsError,
    share_trained_weights,
    trained_weights_unsupported_reason,
)
from lightning_rl.rollout.vllm_process import VLLMProcessEngine


def _fake_engine(policy, dtypes=None):
    """The engine process as a worker over a fake vLLM model holding every weight in bf16 (or ``dtypes[name]``)."""
    dtypes = dtypes or {}
    fake = LoadingFakeModel({n: torch.zeros(p.shape, dtype=dtypes.get(n, torch.bfloat16))
                             for n, p in policy.named_parameters()})
    engine = attach_worker(object.__new__(VLLMProcessEngine), fake)
    return engine, fake


@pytest.fixture
def handed_over(monkeypatch):
    monkeypatch.setattr(vllm_process, "ipc_handles", functools.partial(vllm_process.ipc_handles, reduce=_hand_over))
    monkeypatch.setattr("torch.multiprocessing.reductions.reduce_tensor", _hand_over)
    yield
    _HANDED.clear()


def _policy_with_masters(path, lr=1e-2):
    torch.manual_seed(0)
    policy, _ = load_policy(path, dtype="float32")
    policy.train()
    masters, opt, streamer = host_master_stepping(policy, lr=lr, chunk_bytes=4096)
    return policy, masters, opt, streamer


def _forward(policy, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 weights beside fp32 norms, as under bf16-mixed
        return policy(input_ids=ids).logits.float()


def _update(policy, streamer, opt, step):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(step))
    _forward(policy, ids).logsumexp(-1).mean().backward()
    streamer.step(opt)
    return ids


def test_trained_weights_are_the_engines_and_reach_it_at_each_sync(saved_tiny_llama, handed_over):
    policy, masters, opt, streamer = _policy_with_masters(saved_tiny_llama(2))
    engine, fake = _fake_engine(policy)
    engine.sync_weights(policy)  # the engine's start: every weight loaded from the trainer's
    assert not engine.syncs_before_each_update

    engine._share_trained_weights(policy, masters)
    shared = engine.shared_weights
    managed = {n for n, p in policy.named_parameters() if masters.manages(p)}
    assert shared.names == managed and len(managed) == 15  # 7 linear weights a layer and the (tied) embedding
    assert engine.syncs_before_each_update and shared.bytes_shared == sum(2 * p.numel() for p in masters.parameters())
    for name, p in policy.named_parameters():
        inside = p.data_ptr() == _engine_rows(fake, name).data_ptr()
        assert inside == (name in managed), name  # the norms stay the trainer's own, fp32
    attached = {name for name, _, _ in engine.llm.worker._lightning_rl_weights}
    assert attached == {n for n, _ in policy.named_parameters()} - managed  # no view of the trainer's old copies

    for step in range(2):
        engine_before = {n: _engine_rows(fake, n).clone() for n, _ in policy.named_parameters()}
        ids = _update(policy, streamer, opt, step)
        for name, t in engine_before.items():  # the engine may be generating from these: the step left them alone
            assert torch.equal(_engine_rows(fake, name), t), (step, name)
        with pytest.raises(StaleSharedWeightsError, match="sync the engine"):
            _forward(policy, ids)
        fake.loads.clear()
        engine.sync_weights(policy)
        assert set(fake.loads) == attached  # the norms load; the shared weights were copied in from host memory
        for name, p in policy.named_parameters():
            want = masters.master(p).to(torch.bfloat16) if masters.manages(p) else p.detach().to(torch.bfloat16)
            assert torch.equal(_engine_rows(fake, name), want), (step, name)
            if masters.manages(p):
                assert not torch.equal(_engine_rows(fake, name), engine_before[name]), (step, name)  # it trained
        _forward(policy, ids)  # synced: the forward runs

    _update(policy, streamer, opt, 2)  # a step whose results still wait when the engine goes
    masters_now = {n: masters.master(p).to(torch.bfloat16) for n, p in policy.named_parameters() if n in managed}
    engine.shutdown()
    assert not engine.shared_weights.views and masters.staging is None
    for name, p in policy.named_parameters():  # private copies, with the step that waited
        assert p.data_ptr() != _engine_rows(fake, name).data_ptr(), name
        if name in managed:
            assert torch.equal(p.data, masters_now[name]), name
    _forward(policy, ids)


def test_weights_the_engine_holds_in_another_dtype_stay_private_and_load_at_each_sync(saved_tiny_llama, handed_over):
    policy, masters, opt, streamer = _policy_with_masters(saved_tiny_llama(1))
    head = "model.embed_tokens.weight"
    engine, fake = _fake_engine(policy, {head: torch.float32})  # as an fp32 copy of the (tied) head would be
    engine.sync_weights(policy)
    engine._share_trained_weights(policy, masters)
    assert head in engine.shared_weights.skipped and head not in engine.shared_weights.names
    assert len(engine.shared_weights.names) == 7
    _update(policy, streamer, opt, 0)
    fake.loads.clear()
    engine.sync_weights(policy)
    assert head in fake.loads
    emb = dict(policy.named_parameters())[head]
    assert torch.equal(_engine_rows(fake, head), emb.detach().float())  # the trainer's rounded values, loaded
    engine.shutdown()


def test_sharing_is_refused_with_the_reason_before_anything_changes(saved_tiny_llama, handed_over, caplog):
    path = saved_tiny_llama(1)
    policy, masters, _, _ = _policy_with_masters(path)
    engine, fake = _fake_engine(policy)
    engine.sync_weights(policy)
    with pytest.raises(ValueError, match="master_weights='cpu'.*share_trained_weights=False"):
        engine._share_trained_weights(policy, None)
    assert not engine.shared_weights.views and masters.staging is None
    wrong = {n: torch.zeros_like(t) for n, t in fake.named_parameters()}  # an engine holding other values
    share, reason = share_trained_weights(policy, SimpleNamespace(
        named_parameters=lambda: iter(wrong.items()), packed_modules_mapping=fake.packed_modules_mapping), masters)
    assert "hold other values" in reason and not share.views and masters.staging is None
    assert all(p.data_ptr() != t.data_ptr() for p in policy.parameters() for t in wrong.values())
    zeroed = {n: torch.zeros_like(t) for n, t in fake.named_parameters()}
    for name, t in zeroed.items():  # the engine process's weights changed under the trainer: nothing matches
        dict(fake.named_parameters())[name].data = t
    engine._share_trained_weights(policy, masters, required=False)  # automatic: stays private, with the reason
    assert "hold other values" in caplog.text and not engine.shared_weights.views and masters.staging is None
    lora, _ = load_policy(path, dtype="float32")
    assert "share_merged_base" in trained_weights_unsupported_reason(apply_lora(lora, {"r": 2}), masters)
    plain, _ = load_policy(path, dtype="float32")
    assert "master_weights='cpu'" in trained_weights_unsupported_reason(plain, None)
    engine.shutdown()


def test_a_weight_the_engine_lacks_stays_private_and_the_rest_is_shared(saved_tiny_llama, handed_over):
    policy, masters, _, _ = _policy_with_masters(saved_tiny_llama(1))
    engine, fake = _fake_engine(policy)
    engine.sync_weights(policy)
    lacking = "model.layers.0.self_attn.o_proj.weight"
    params = {n: t for n, t in fake.named_parameters() if n != lacking}
    share, reason = share_trained_weights(policy, SimpleNamespace(
        named_parameters=lambda: iter(params.items()), packed_modules_mapping=fake.packed_modules_mapping), masters)
    assert reason is None and lacking in share.skipped and "no parameter" in share.skipped[lacking]
    assert len(share.views) == 7 and lacking not in share.names
    o_proj = dict(policy.named_parameters())[lacking]
    assert not masters.stages(o_proj) and all(masters.stages(p) for p, _ in share.views.values())
    share.unshare()
    assert masters.staging is None
    engine.shutdown()
