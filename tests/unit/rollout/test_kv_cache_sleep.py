"""The KV-only sleep's bookkeeping and the engine's sleep/sync paths with shared weights, with fakes on CPU."""

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from lightning_rl.rollout import vllm as vllm_mod
from lightning_rl.rollout import vllm_internals, vllm_sizing
from lightning_rl.rollout.shared_weights import SharedBaseWeights
from lightning_rl.rollout.sleep_state import Memory, SleepState
from lightning_rl.rollout.vllm_internals import VLLMInternals


@pytest.fixture
def fake_cumem(monkeypatch):
    """A stand-in for ``vllm.device_allocator.cumem``: allocations with tags, map/unmap calls recorded."""
    calls = []
    allocs = {
        1: SimpleNamespace(handle=(0, 100, 1, 11), tag="weights", is_asleep=False),
        2: SimpleNamespace(handle=(0, 300, 2, 12), tag="kv_cache", is_asleep=False),
        3: SimpleNamespace(handle=(0, 500, 3, 13), tag="kv_cache", is_asleep=False),
    }
    allocator = SimpleNamespace(pointer_to_data=allocs)
    module = ModuleType("vllm.device_allocator.cumem")
    module.CuMemAllocator = SimpleNamespace(get_instance=lambda: allocator)
    module.unmap_and_release = lambda handle: calls.append(("unmap", handle[3]))
    module.create_and_map = lambda handle: calls.append(("map", handle[3]))
    for name in ("vllm", "vllm.device_allocator"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator.cumem", module)
    return allocs, calls


def test_release_and_restore_touch_only_the_kv_cache(fake_cumem):
    allocs, calls = fake_cumem
    assert vllm_internals.release_kv_cache() == 800
    assert calls == [("unmap", 12), ("unmap", 13)]
    assert [a.is_asleep for a in allocs.values()] == [False, True, True]
    assert vllm_internals.release_kv_cache() == 0  # already released: nothing unmapped twice
    assert len(calls) == 2

    runner = SimpleNamespace(woken=0)
    runner.post_kv_cache_wake_up = lambda: setattr(runner, "woken", runner.woken + 1)
    vllm_internals.restore_kv_cache(runner)
    assert calls[2:] == [("map", 12), ("map", 13)]
    assert not any(a.is_asleep for a in allocs.values())
    assert runner.woken == 1  # vLLM re-initialises what lives in the KV memory


class FakeLLM:
    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("llm.sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("llm.wake_up", tuple(tags or ())))

    def reset_prefix_cache(self):
        self.calls.append(("llm.reset_prefix_cache",))


class FakeInternals(VLLMInternals):
    """vLLM's private parts without vLLM: weight loads recorded, the KV cache released through the (fake) CuMem."""

    def __init__(self, calls):
        super().__init__(llm=None)
        self.calls = calls

    @property
    def runner(self):
        return SimpleNamespace(post_kv_cache_wake_up=lambda: self.calls.append(("post_kv",)))

    def load_weights(self, weights):
        self.calls.append(("load", len(list(weights))))


def _engine_without_vllm(calls, sleep_level=2, views=None, lora_mode=None, llm=None):
    """A VLLMEngine's state machine around a fake LLM (no vLLM, no GPU), awake with synced weights."""
    engine = vllm_mod.VLLMEngine.from_llm(llm or FakeLLM(calls), FakeInternals(calls), eos_token_ids=[2],
                                          pad_token_id=0, max_model_len=64, lora_mode=lora_mode,
                                          sleep_level=sleep_level, state=SleepState(weights_synced=True))
    engine.shared = SharedBaseWeights(views or {})
    return engine


def test_shared_weights_make_sleep_release_only_the_kv_cache(fake_cumem):
    _, alloc_calls = fake_cumem
    calls = []
    p = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    engine = _engine_without_vllm(calls, sleep_level=1, views={"w": (p, p.data)})
    engine.sleep()
    assert ("llm.sleep", 1) not in calls and engine.state.memory is Memory.KV_RELEASED and engine.is_sleeping
    assert alloc_calls == [("unmap", 12), ("unmap", 13)]
    engine.wake_up()  # the weights never left
    engine._wake_kv()  # what generate() does first
    assert ("post_kv",) in calls and ("llm.reset_prefix_cache",) in calls and engine.state.memory is Memory.AWAKE


def test_sleep_level_zero_and_level_two(fake_cumem):
    calls = []
    engine = _engine_without_vllm(calls, sleep_level=0)
    engine.sleep()
    assert engine.state.memory is Memory.KV_RELEASED and not calls  # no vLLM sleep at all
    engine._wake_kv()
    calls.clear()
    engine.sleep(level=2)
    assert calls == [("llm.sleep", 2)] and not engine.state.weights_synced and engine.needs_sync


def test_a_full_or_merged_push_unshares_the_trainer_first(fake_cumem, monkeypatch):
    calls = []
    storage = torch.arange(6.0)
    p = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    p.data = storage[:3]  # the "engine's" memory
    engine = _engine_without_vllm(calls, lora_mode="merged", views={"w": (p, storage[:3])})
    monkeypatch.setattr(vllm_mod, "merged_lora_weights", lambda model, root=None: iter([("w", torch.ones(3))]))
    engine.sync_weights(torch.nn.Linear(1, 1))
    assert not engine.shared.views
    assert p.data_ptr() != storage.data_ptr()  # a private copy now: the push cannot overwrite it
    assert torch.equal(p.data, torch.tensor([0.0, 1.0, 2.0]))
    assert ("load", 1) in calls


def test_auto_sleep_level_keeps_small_weights_and_drops_large_ones():
    assert vllm_sizing.auto_sleep_level("adapter", 10 << 30) == 1  # the base waits in CPU memory
    assert vllm_sizing.auto_sleep_level(None, 270 << 20) == 0  # SmolLM2-135M in bf16: stays on the GPU
    assert vllm_sizing.auto_sleep_level("merged", 270 << 20) == 0
    assert vllm_sizing.auto_sleep_level(None, 3 << 30) == 2  # a 1.5B model: dropped, pushed again at the sync
    assert vllm_sizing.auto_sleep_level(None, 270 << 20, keep_weights_bytes=0) == 2


def test_generate_builds_the_rollout_from_vllm_outputs(monkeypatch):
    import sys

    from lightning_rl.rollout import SamplingConfig

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    step = SimpleNamespace

    class GeneratingLLM(FakeLLM):
        llm_engine = SimpleNamespace(step=lambda: [])

        def generate(self, prompts, params, use_tqdm, lora_request):
            self.calls.append(("generate", len(prompts), params["n"], params["logprobs"]))
            for _ in range(3):  # vLLM's loop: a prefill step, then one per token
                self.llm_engine.step()
            outs = [step(index=1, token_ids=[7], logprobs=[{7: step(logprob=-2.0)}], finish_reason="length"),
                    step(index=0, token_ids=[5, 6], logprobs=[{5: step(logprob=-0.5)}, {6: step(logprob=-1.0)}],
                         finish_reason="stop")]
            return [step(outputs=outs) for _ in prompts]

    calls = []
    engine = _engine_without_vllm(calls, sleep_level=0, llm=GeneratingLLM(calls))
    rollout = engine.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=2, temperature=1.0), num_generations=2)
    assert calls == [("generate", 1, 2, 0)]
    assert rollout.completion_ids.tolist() == [[5, 6], [7, 0]]  # ordered by completion index, right-padded
    assert rollout.completion_mask.tolist() == [[1, 1], [1, 0]]
    assert rollout.sampling_logprobs.tolist() == [[-0.5, -1.0], [-2.0, 0.0]]
    assert rollout.finish_reasons == ["stop", "length"] and rollout.group_index.tolist() == [0, 0]
    assert rollout.extras["engine_steps"] == 3  # each step timed
    assert 0 <= rollout.extras["engine_step_ms"] <= rollout.extras["engine_step_max_ms"]


def test_a_tensor_parallel_member_generates_the_groups_prompts_and_keeps_its_own_rows(monkeypatch):
    import sys

    from lightning_rl.rollout import SamplingConfig
    from lightning_rl.rollout.engine_ranks import EngineRanks

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    step = SimpleNamespace
    group = object()
    gathered = []

    def gather(prompt_ids, tp_group):  # rank 0 of the group gave 2 prompts, this rank (1) gives its own
        gathered.append((prompt_ids, tp_group))
        return [[1, 1], [1, 2], *prompt_ids], [2, len(prompt_ids)]

    class EchoLLM(FakeLLM):
        def generate(self, prompts, params, use_tqdm, lora_request):  # completion tokens: the prompt's last id
            self.calls.append(("generate", [p["prompt_token_ids"] for p in prompts], params["n"]))
            return [step(outputs=[step(index=i, token_ids=[p["prompt_token_ids"][-1]] * 2,
                                       logprobs=[{p["prompt_token_ids"][-1]: step(logprob=-1.0)}] * 2,
                                       finish_reason="stop") for i in range(params["n"])]) for p in prompts]

    monkeypatch.setattr(vllm_mod, "gather_group_prompts", gather)
    calls = []
    engine = vllm_mod.VLLMEngine.from_llm(
        EchoLLM(calls), FakeInternals(calls), eos_token_ids=[2], pad_token_id=0, max_model_len=64,
        state=SleepState(weights_synced=True), tp_group=group,
        ranks=EngineRanks(rank=3, world_size=4, tensor_parallel_size=2, distributed=True))
    rollout = engine.generate([[3, 7], [3, 8], [3, 9]], SamplingConfig(max_new_tokens=2), num_generations=2)
    assert gathered == [([[3, 7], [3, 8], [3, 9]], group)]
    assert calls == [("generate", [[1, 1], [1, 2], [3, 7], [3, 8], [3, 9]], 2)]  # the group's 5 prompts, once
    assert rollout.num_sequences == 6  # this rank's 3 prompts x 2
    assert rollout.completion_ids[:, 0].tolist() == [7, 7, 8, 8, 9, 9]
    assert rollout.prompt_ids[:, -1].tolist() == [7, 7, 8, 8, 9, 9]
    assert rollout.group_index.tolist() == [0, 0, 1, 1, 2, 2]


def test_level_one_sleep_brings_the_weights_back_before_the_kv_cache(fake_cumem):
    calls = []
    engine = _engine_without_vllm(calls, sleep_level=1)
    engine.sleep()
    assert calls == [("llm.sleep", 1)] and engine.state.memory is Memory.ASLEEP and not engine.needs_sync
    engine.sleep()  # asleep already: nothing more
    engine.wake_up()
    assert calls[-1] == ("llm.wake_up", ("weights",)) and engine.state.memory is Memory.WEIGHTS_AWAKE
    engine.sync_weights(torch.nn.Linear(2, 2))
    assert calls[-1] == ("load", 2)  # no prefix-cache reset while the KV cache sleeps
    engine._wake_kv()
    assert calls[-1] == ("llm.wake_up", ("kv_cache",)) and not engine.is_sleeping


def test_generate_refuses_weights_a_level_two_sleep_dropped(fake_cumem, monkeypatch):
    from lightning_rl.rollout import SamplingConfig

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    engine = _engine_without_vllm([], sleep_level=2)
    engine.sleep()
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.generate([[1, 2]], SamplingConfig(max_new_tokens=2))


def test_vllm_outside_the_supported_range_is_refused_naming_it():
    for version in ("0.26.0", "0.31.2", "0.30.0rc1"):
        vllm_internals.check_vllm_version(version)
    for version in ("0.25.2", "0.32.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"vllm>=0\.26,<0\.32.*" + version.replace(".", r"\.")):
            vllm_internals.check_vllm_version(version)
