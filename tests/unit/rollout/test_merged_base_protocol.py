"""The engine process's side of a merged shared LoRA base, run in this process on a CPU.

``VLLMProcessEngine``'s calls go to a ``PolicyWeightReceiver`` holding a vLLM-shaped fake model (packed q/k/v and
gate/up, a ``load_weights`` that writes rows of the packed weights), and CUDA IPC is replaced by handing the same
tensors over. What is checked: the first sync merges from the trainer's base, sharing points the trainer at the
engine's weights and keeps the pristine base in the trainer's host memory (the engine process keeps none), later
syncs merge the adapters as trained in the trainer's process, and shutting down gives the trainer its base back.
"""

import functools
from types import SimpleNamespace

import pytest
import torch
from test_shared_weights import FakeVLLMModel

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout import vllm_process
from lightning_rl.rollout.engine_weights import engine_weights, merged_weight
from lightning_rl.rollout.merged_base import MergedBase, StaleMergedBaseError
from lightning_rl.rollout.shared_trained_weights import SharedTrainedWeights
from lightning_rl.rollout.shared_weights import frozen_base_parameters
from lightning_rl.rollout.sleep_state import SleepState
from lightning_rl.rollout.vllm_process import VLLMProcessEngine
from lightning_rl.rollout.vllm_worker import PolicyWeightReceiver

_HANDED: dict[int, torch.Tensor] = {}


def _open(key: int) -> torch.Tensor:
    return _HANDED[key]


def _hand_over(t: torch.Tensor):
    """Stands in for CUDA IPC: the other side gets the same tensor (the same memory)."""
    _HANDED[id(t)] = t
    return _open, (id(t),)


class LoadingFakeModel(FakeVLLMModel):
    """The fake vLLM model with ``load_weights``: transformers names written into rows of the packed weights."""

    def __init__(self, hf_params):
        super().__init__(hf_params)
        self.rows = {k: v.shape[0] for k, v in hf_params.items()}
        self.loads: list[str] = []

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters())

    @torch.no_grad()
    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, t in weights:
            self.loads.append(name)
            parent, module, leaf = name.rsplit(".", 2)
            for fused, parts in self.packed_modules_mapping.items():
                if module in parts:
                    offset = sum(self.rows[f"{parent}.{p}.{leaf}"] for p in parts[: parts.index(module)])
                    params[f"{parent}.{fused}.{leaf}"][offset:offset + t.shape[0]].copy_(t)
                    break
            else:
                params[name][: t.shape[0]].copy_(t)


class FakeLLM:
    def __init__(self, worker):
        self.worker, self.prefix_resets = worker, 0

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1


@pytest.fixture
def engine_and_policy(saved_tiny_llama, monkeypatch):
    monkeypatch.setattr(vllm_process, "ipc_handles", functools.partial(vllm_process.ipc_handles, reduce=_hand_over))
    monkeypatch.setattr("torch.multiprocessing.reductions.reduce_tensor", _hand_over)
    torch.manual_seed(0)
    model, _ = load_policy(saved_tiny_llama(2), dtype="float32")
    policy = apply_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}).train()
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fake = LoadingFakeModel({k: torch.zeros_like(v) for k, v in frozen_base_parameters(policy).items()})
    worker = PolicyWeightReceiver()
    worker.model_runner = SimpleNamespace(get_model=lambda: fake)
    engine = object.__new__(VLLMProcessEngine)  # the engine process is the worker above
    engine.llm, engine.internals, engine.state, engine._dir = FakeLLM(worker), None, SleepState(), ""
    engine._attached, engine.merged_base, engine.merged_base_freed_bytes = (), MergedBase(), 0
    engine.shared_weights = SharedTrainedWeights()
    yield engine, policy, fake
    engine.shutdown()
    _HANDED.clear()


def _merged_expected(policy, pristine):
    return {w.name: merged_weight(pristine[w.name], w.products) for w in engine_weights(policy)}


def _engine_rows(fake, name):
    params = dict(fake.named_parameters())
    parent, module, leaf = name.rsplit(".", 2)
    for fused, parts in fake.packed_modules_mapping.items():
        if module in parts:
            offset = sum(fake.rows[f"{parent}.{p}.{leaf}"] for p in parts[: parts.index(module)])
            return params[f"{parent}.{fused}.{leaf}"][offset:offset + fake.rows[name]]
    return params[name][: fake.rows[name]]


def test_a_shared_merged_base_follows_the_trained_adapters_and_comes_back_at_shutdown(engine_and_policy):
    engine, policy, fake = engine_and_policy
    pristine = {k: v.detach().clone() for k, v in frozen_base_parameters(policy).items()}
    engine.sync_weights(policy)  # the first sync: merged from the trainer's own base
    for name, want in _merged_expected(policy, pristine).items():
        torch.testing.assert_close(_engine_rows(fake, name), want, rtol=0, atol=0)
    parts = engine.last_sync_timings  # where the sync's time went, for the benchmark's record
    assert set(parts) == {"prepare_s", "attach_s", "device_wait_s", "load_s", "prefix_reset_s"}
    assert all(v >= 0 for v in parts.values()) and parts["attach_s"] > 0 and parts["load_s"] > 0

    engine._share_merged_base(policy)
    assert engine.syncs_before_each_update and engine.merged_base.bytes_shared > 0
    for name, p in frozen_base_parameters(policy).items():  # the trainer reads the engine's memory, merged
        assert p.data_ptr() == _engine_rows(fake, name).data_ptr(), name
    assert engine.llm.worker._lightning_rl_weights is None  # no view of the trainer's (gone) base
    kept = engine.merged_base.pristine  # the pristine base stays in the trainer's host memory
    assert kept.keys() == pristine.keys() and all(torch.equal(kept[k], v) for k, v in pristine.items())
    assert set(engine.merged_base.adapted) == {w.name for w in engine_weights(policy) if w.products}

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    with pytest.raises(StaleMergedBaseError):
        policy(input_ids=ids)
    fake.loads.clear()
    resets = engine.llm.prefix_resets
    engine.sync_weights(policy)  # this process merges the trained adapters into the engine's weights: no load
    assert fake.loads == [] and engine.llm.prefix_resets == resets + 1
    assert engine.last_sync_timings["load_s"] > 0 and engine.last_sync_timings["attach_s"] == 0
    for name, want in _merged_expected(policy, pristine).items():
        torch.testing.assert_close(_engine_rows(fake, name), want.to(_engine_rows(fake, name).dtype), rtol=0, atol=0)
    policy(input_ids=ids)  # synced: the forward runs
    with pytest.raises(RuntimeError, match="before lightning_rl_attach"):  # the engine process keeps no base
        engine.llm.worker.lightning_rl_load()

    engine.shutdown()  # the trainer gets its pristine base back as private tensors
    for name, p in frozen_base_parameters(policy).items():
        assert torch.equal(p, pristine[name]) and p.data_ptr() != _engine_rows(fake, name).data_ptr(), name
    assert not engine.merged_base.views
