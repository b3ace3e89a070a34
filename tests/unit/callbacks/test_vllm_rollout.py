"""VLLMRollout's hooks, state and sizing with a fake engine on CPU (its fits: tests/integration/callbacks)."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import FakeEngine, fake_rollout, rollout_grpo

from lightning_rl import MemoryAwarePrecision, VLLMRollout
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.plugins.dtypes import trainer_compute_dtype
from lightning_rl.plugins.memory_plan import kv_bytes_per_token
from lightning_rl.rollout import EngineSettings, vllm_sizing

GIB = 2**30


def _settings(**settings):
    """A callback with these engine settings."""
    return VLLMRollout(settings=EngineSettings(**settings))


def _hook_setup():
    calls = []
    module = rollout_grpo()
    module.configure_model()
    cb = fake_rollout(calls)
    trainer = SimpleNamespace(global_step=0, datamodule=None)
    module.log_dict = lambda *a, **k: None
    return calls, module, cb, trainer


def test_no_sync_when_weights_did_not_change():
    calls, module, cb, trainer = _hook_setup()
    for i in range(3):
        batch = {"prompt": ["1+1=", "2+2="]}
        cb.on_train_batch_start(trainer, module, batch, i)
        assert batch["rollout"].num_sequences == 4
    assert "sync" not in calls and calls.count("generate") == 3
    trainer.global_step = 1
    cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 3)
    assert calls[-4:] == ["wake", "sync", "generate", "sleep"]
    assert set(cb.last_timings) == {"wake_s", "sync_s", "generate_s", "sleep_s", "toggle_s"}


def test_sleeps_even_when_generation_fails():
    calls, module, cb, trainer = _hook_setup()
    cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 0)
    cb.engine.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cb.on_train_batch_start(trainer, module, {"prompt": ["1+1="]}, 1)
    assert calls[-1] == "sleep"


def test_state_dict_round_trip():
    cb = VLLMRollout(settings=EngineSettings(seed=7))
    cb.last_synced_step, cb.num_syncs, cb.num_rollouts = 5, 4, 6
    other = VLLMRollout()
    other.load_state_dict(cb.state_dict())
    assert other.settings.seed == 7 and other._restored_step == 5 and other.num_syncs == 4 and other.num_rollouts == 6
    seeds = []
    other.engine_factory = lambda module, n, seed: seeds.append(seed) or FakeEngine(module, [])
    module = rollout_grpo()
    module.configure_model()
    other._create(SimpleNamespace(global_step=5), module, 2)
    assert seeds == [12]  # seed + last synced step: a resumed run does not replay the first rollouts


def test_batch_must_be_a_dict_with_prompts():
    calls, module, cb, trainer = _hook_setup()
    with pytest.raises(TypeError, match="'prompt'"):
        cb.on_train_batch_start(trainer, module, [1, 2], 0)


def test_weights_kept_asleep_follow_the_engines_sync_mode_and_sleep_level():
    net, _ = load_policy("tiny-llama")
    full_bytes = sum(p.numel() for p in net.parameters()) * 4  # fp32 policy, engine dtype "auto"
    assert vllm_sizing.lora_sync_mode(net, "auto") == (None, None)
    assert VLLMRollout().weights_kept_asleep_bytes(net) == full_bytes  # small: level 0 keeps them
    assert _settings(dtype="bfloat16").weights_kept_asleep_bytes(net) == full_bytes // 2
    assert _settings(keep_weights_bytes=0).weights_kept_asleep_bytes(net) == 0  # level 2 drops them
    assert _settings(sleep_level=1, keep_weights_bytes=0).weights_kept_asleep_bytes(net) == 0
    assert _settings(sleep_level=0, keep_weights_bytes=0).weights_kept_asleep_bytes(net) == full_bytes
    peft = apply_lora(net, {"r": 4, "lora_alpha": 8})
    assert vllm_sizing.lora_sync_mode(peft, "auto") == ("adapter", None)
    assert vllm_sizing.lora_sync_mode(peft, "merged") == ("merged", None)
    assert VLLMRollout().weights_kept_asleep_bytes(peft) == 0  # adapter sync: the base waits in CPU memory
    merged = sum(p.numel() for p in peft.get_base_model().parameters()) * 4
    assert _settings(lora_sync="merged").weights_kept_asleep_bytes(peft) == merged


def test_engine_dtype_follows_the_trainers_compute_dtype():
    net, _ = load_policy("tiny-llama")  # fp32 weights
    bf16_mixed = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(precision_plugin=None))
    full = SimpleNamespace(precision="32-true", strategy=SimpleNamespace(precision_plugin=None))
    plugin = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(precision_plugin=MemoryAwarePrecision()))
    assert trainer_compute_dtype(bf16_mixed) == torch.bfloat16
    assert trainer_compute_dtype(plugin) == torch.bfloat16
    assert trainer_compute_dtype(full) is None and trainer_compute_dtype(None) is None
    cb = VLLMRollout()
    assert cb.engine_dtype(net, bf16_mixed) == torch.bfloat16  # fp32 masters, bf16 products: a bf16 engine
    assert cb.engine_dtype(net, plugin) == torch.bfloat16
    assert cb.engine_dtype(net, full) == torch.float32  # a trainer in full precision keeps an fp32 engine
    assert _settings(dtype="float32").engine_dtype(net, bf16_mixed) == torch.float32  # explicit wins
    full_bytes = sum(p.numel() for p in net.parameters()) * 4
    assert cb.weights_kept_asleep_bytes(net, bf16_mixed) == full_bytes // 2


def test_lora_adapters_never_get_an_fp32_engine():
    net, _ = load_policy("tiny-llama")
    peft = apply_lora(net, {"r": 4, "lora_alpha": 8})
    # vLLM's LoRA kernels take 16-bit adapters: "auto" over fp32 weights and an fp32 trainer gives bf16
    assert vllm_sizing.engine_weight_dtype(peft, "auto", None, adapter=True) == torch.bfloat16
    assert VLLMRollout().engine_dtype(peft, None) == torch.bfloat16
    assert _settings(lora_sync="merged").engine_dtype(peft, None) == torch.float32  # merged weights may be fp32
    with pytest.raises(ValueError, match="16-bit engine.*bfloat16.*merged"):
        _settings(dtype="float32").engine_dtype(peft, None)


def test_importance_sampling_auto_corrects_only_rollouts_of_another_engine():
    module = rollout_grpo()
    module.configure_model()
    rollout = module.generate_rollout(["say 1", "say 2"])
    assert module.importance_sampling == "auto"
    assert module.importance_level(rollout) == "none"  # the policy sampled it itself
    rollout.extras["engine"] = "vllm"
    assert module.importance_level(rollout) == "token"
    assert rollout_grpo(importance_sampling="sequence").importance_level(rollout) == "sequence"
    with pytest.raises(ValueError, match="'auto' or one of"):
        rollout_grpo(importance_sampling="tokens")


def test_rollout_memory_counts_the_kv_cache_the_engine_gets():
    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=None)
    cb = VLLMRollout(prompts_per_step=2)
    cb.setup(trainer, module, "fit")
    shape = module.training_shape()
    memory = cb.rollout_memory(shape)
    per_token = kv_bytes_per_token(module.policy.config, 2)  # a bf16 engine under bf16-mixed
    assert memory.kv_bytes_per_token == per_token and not memory.sized_by_gpu_fraction
    engine_kv = vllm_sizing.kv_cache_bytes_for(module.policy.config, 2, 2, 32, 4, torch.bfloat16,
                                               cb.settings.kv_cache_headroom)
    assert math.ceil(memory.kv_tokens * memory.headroom) * per_token == engine_kv  # what build_engine gives it
    assert memory.engine_weight_bytes == sum(p.numel() for p in module.policy.parameters()) * 2
    assert memory.weights_kept_asleep_bytes == memory.engine_weight_bytes  # small: level 0 keeps them
    assert memory.min_kv_tokens == cb.max_len(shape) + 16  # one whole sequence: the least for waves
    fixed = VLLMRollout(prompts_per_step=2, settings=EngineSettings(kv_cache_bytes=100 * per_token))
    fixed.setup(trainer, module, "fit")
    assert (fixed.rollout_memory(shape).kv_tokens, fixed.rollout_memory(shape).headroom) == (100, 1.0)
    assert fixed.rollout_memory(shape).min_kv_tokens == 0  # the user's KV cache size stands
    fraction = VLLMRollout(settings=EngineSettings(gpu_memory_utilization=0.3))
    fraction.setup(trainer, module, "fit")
    assert fraction.rollout_memory(shape).sized_by_gpu_fraction and fraction.rollout_memory(shape).kv_tokens == 0


def test_a_kv_cache_sized_from_the_data_holds_the_longest_prompt_and_keeps_the_engines_limit():
    from lightning_rl import PromptDataModule

    module = rollout_grpo()
    module.configure_model()
    data = PromptDataModule(train_data=[{"prompt": "say 1"}, {"prompt": "say 12345"}],
                            val_data=[{"prompt": "say 1234567890"}], batch_size=2)
    data.setup("fit")
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=data)
    shape = module.training_shape()
    assert VLLMRollout().settings.kv_prompt_tokens == "data"  # the default
    limit, by_data = _settings(kv_prompt_tokens="limit"), _settings(kv_prompt_tokens="data")
    limit.prompts_per_step = by_data.prompts_per_step = 2
    for cb in (limit, by_data):
        cb.setup(trainer, module, "fit")
    longest = max(len(ids) for ids in module.encode(["say 1", "say 12345", "say 1234567890"]))  # the val prompt
    assert 0 < longest < shape.max_prompt_tokens
    assert by_data.prompt_tokens(shape) == longest and limit.prompt_tokens(shape) == shape.max_prompt_tokens
    assert by_data.kv_tokens(shape, 2) < limit.kv_tokens(shape, 2)
    assert by_data.rollout_memory(shape).kv_tokens == by_data.kv_tokens(shape, 2)
    assert by_data.max_len(shape) == limit.max_len(shape)  # longer prompts are still accepted by the engine
    by_data._trainer = None  # after the fit (teardown): the plan's figure stays readable
    assert by_data.prompt_tokens(shape) == longest
    data.train_rows = None  # a DataModule without rows to measure: the module's limit
    again = _settings(kv_prompt_tokens="data")
    again.setup(trainer, module, "fit")
    assert again.prompt_tokens(shape) == shape.max_prompt_tokens
    with pytest.raises(ValueError, match="kv_prompt_tokens must be one of"):
        EngineSettings(kv_prompt_tokens="longest")


def test_the_longest_prompt_is_left_unmeasured_for_large_or_foreign_data():
    from lightning_rl.rollout.data_prompts import longest_prompt_tokens

    def encode(prompts, names=None):
        return [list(range(len(p))) for p in prompts]

    rows = SimpleNamespace(train_rows=[{"prompt": "abc"}, {"prompt": "abcdef"}], val_rows=None)
    assert longest_prompt_tokens(rows, encode) == 6
    assert longest_prompt_tokens(rows, encode, max_rows=1) is None  # too many rows to render at setup
    assert longest_prompt_tokens(SimpleNamespace(train_rows=[("abc",)]), encode) is None  # rows of another form
    assert longest_prompt_tokens(None, encode) is None  # dataloaders passed to fit directly


def test_rollout_memory_of_a_tensor_parallel_shard():
    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=None)
    one, two = VLLMRollout(prompts_per_step=2), _settings(tensor_parallel_size=2)
    two.prompts_per_step = 2
    for cb in (one, two):
        cb.setup(trainer, module, "fit")
    shape = module.training_shape()
    alone, shard = one.rollout_memory(shape), two.rollout_memory(shape)
    assert shard.kv_bytes_per_token == kv_bytes_per_token(module.policy.config, 2, tensor_parallel_size=2)
    assert shard.kv_bytes_per_token * 2 == alone.kv_bytes_per_token  # tiny-llama: 2 KV heads, one per shard
    assert shard.kv_tokens == two.kv_tokens(shape, 4)  # the group generates both processes' 2 prompts
    engine_kv = vllm_sizing.kv_cache_bytes_for(module.policy.config, 2, 2, 32, 4, torch.bfloat16,
                                               two.settings.kv_cache_headroom, tensor_parallel_size=2)
    assert math.ceil(shard.kv_tokens * shard.headroom) * shard.kv_bytes_per_token == engine_kv
    assert shard.engine_weight_bytes == -(-alone.engine_weight_bytes // 2)


def test_a_lora_base_shared_with_an_in_process_engine_counts_once_in_the_plan():
    """The trainer's frozen base points at the engine's weights: the plan counts it as frozen weights only."""
    from lightning_rl.rollout.shared_weights import frozen_base_parameters

    module = rollout_grpo(lora={"r": 4, "lora_alpha": 8})
    module.configure_model()
    plugin = MemoryAwarePrecision(compute_dtype="bfloat16")  # frozen weights in bf16, the engine's dtype
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=plugin,
                              strategy=SimpleNamespace(precision_plugin=plugin), datamodule=None)
    shape = module.training_shape()
    total = vllm_sizing.engine_weight_bytes(module.policy, torch.bfloat16)
    base = sum(p.numel() for p in frozen_base_parameters(module.policy).values()) * 2
    assert 0 < base < total

    def engine_bytes(**kw):
        cb = VLLMRollout(prompts_per_step=2, **kw)
        cb.setup(trainer, module, "fit")
        return cb.rollout_memory(shape).engine_weight_bytes

    assert engine_bytes(overlap=False) == total - base  # the adapter's slots and what is not frozen
    assert engine_bytes(overlap=False, settings=EngineSettings(share_base_weights=False)) == total
    assert engine_bytes(overlap=False, settings=EngineSettings(lora_sync="merged")) == total  # full pushes
    fp32_frozen = MemoryAwarePrecision(compute_dtype="bfloat16", frozen_dtype="float32")
    trainer.precision_plugin = trainer.strategy.precision_plugin = fp32_frozen
    assert engine_bytes(overlap=False) == total  # fp32 frozen weights cannot point at a bf16 engine


def test_an_fp8_kv_cache_asked_of_vllm_counts_one_byte_an_element():
    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=None)
    shape = module.training_shape()
    plain = VLLMRollout(prompts_per_step=2)
    fp8 = VLLMRollout(prompts_per_step=2, settings=EngineSettings(engine_kwargs={"kv_cache_dtype": "fp8"}))
    for cb in (plain, fp8):
        cb.setup(trainer, module, "fit")
    bf16_kv, fp8_kv = plain.rollout_memory(shape), fp8.rollout_memory(shape)
    assert fp8_kv.kv_bytes_per_token * 2 == bf16_kv.kv_bytes_per_token
    assert fp8_kv.kv_tokens == bf16_kv.kv_tokens and fp8_kv.engine_weight_bytes == bf16_kv.engine_weight_bytes
    assert vllm_sizing.kv_cache_dtype(fp8.settings, torch.bfloat16) == torch.float8_e4m3fn
    assert vllm_sizing.kv_cache_dtype(plain.settings, torch.bfloat16) == torch.bfloat16
    full = vllm_sizing.kv_cache_bytes_for(module.policy.config, 2, 2, 32, 4, torch.bfloat16)
    assert vllm_sizing.kv_cache_bytes_for(module.policy.config, 2, 2, 32, 4, torch.float8_e4m3fn) * 2 == full


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("started_gib", [1.1, 2.0])
def test_the_engines_start_is_measured_and_checked_against_the_memory_plan(monkeypatch, caplog, overlapping,
                                                                         started_gib):
    from lightning_rl.callbacks import vllm_rollout
    from lightning_rl.plugins.memory_plan import ENGINE_BESIDE_PART, GiB, MemoryPlan

    used = iter([3 * GiB, int((3 + started_gib) * GiB)])  # before and after the engine starts
    monkeypatch.setattr(vllm_rollout, "device_used_bytes", lambda device: next(used))
    plugin = MemoryAwarePrecision(engine_overhead_bytes=GiB // 4)
    if overlapping:  # one train-phase part for the engine process
        parts = dict(train_parts={ENGINE_BESIDE_PART: GiB})
    else:  # weights, workspace and KV cache in the rollout phase
        parts = dict(rollout_parts={"engine weights": GiB // 2, "engine workspace": GiB // 4, "KV cache": GiB // 4,
                                    "trainable weights": 5 * GiB})
    plugin.memory_plan = MemoryPlan(budget_bytes=10 * GiB, micro_batch_tokens=64, kv_cache_bytes=GiB // 4, **parts)
    cb = VLLMRollout(engine_factory=lambda module, n, seed: FakeEngine(module, []))
    cb._plugin = plugin
    module = rollout_grpo()
    module.configure_model()
    with caplog.at_level("INFO"):
        cb._create(SimpleNamespace(global_step=0), module, 2)
    cb.overlapping = overlapping
    assert cb.engine_start_bytes == int((3 + started_gib) * GiB) - 3 * GiB
    assert "device memory in use rose by" in caplog.text and "the memory plan counted 1.00 GiB" in caplog.text
    caplog.clear()
    cb._check_engine_memory(cb.engine_start_bytes)
    over = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if started_gib == 1.1:  # within the plan's reserve of its figure
        assert not over
        return
    assert len(over) == 1 and "took 2.00 GiB" in over[0] and "counted 1.00 GiB" in over[0]
    if overlapping:
        assert "VLLMRollout(overlap=False)" in over[0]
    else:  # the workspace the plan should count: its estimate plus what the start took beyond the plan
        assert f"engine_overhead_bytes={GiB // 4 + GiB}" in over[0]


def test_the_engines_start_is_measured_in_this_process_tree_when_nvml_lists_it(monkeypatch):
    """Other jobs on the GPU must not move the figure (a parallel start read -0.85 GiB device-wide)."""
    from lightning_rl.callbacks import vllm_rollout

    tree = iter([1000, 3000])  # before and after the engine's start
    device_wide = iter([50_000, 10_000])  # another job freed 40,000 meanwhile
    monkeypatch.setattr(vllm_rollout, "process_tree_used_bytes", lambda device: next(tree))
    monkeypatch.setattr(vllm_rollout, "device_used_bytes", lambda device: next(device_wide))
    measure, before = vllm_rollout._engine_start_measure("cuda:0")
    assert measure("cuda:0") - before == 2000
    # where NVML cannot list processes (a PID namespace of its own), and off CUDA: the whole device's use
    monkeypatch.setattr(vllm_rollout, "process_tree_used_bytes", lambda device: None)
    monkeypatch.setattr(vllm_rollout, "device_used_bytes", lambda device: 7)
    for device in ("cuda:0", "cpu"):
        measure, before = vllm_rollout._engine_start_measure(device)
        assert measure is vllm_rollout.device_used_bytes and before == 7


def test_planned_engine_bytes_reads_either_phase_of_the_plan():
    from lightning_rl.plugins.memory_plan import ENGINE_BESIDE_PART, GiB, MemoryPlan, planned_engine_bytes

    def plan(**parts):
        return MemoryPlan(budget_bytes=GiB, micro_batch_tokens=1, kv_cache_bytes=None, **parts)

    assert planned_engine_bytes(plan(rollout_parts={"trainable weights": 5})) is None  # transformers generate
    between = {"engine weights": 3, "KV cache": 4, "trainable weights": 100}
    assert planned_engine_bytes(plan(rollout_parts=between)) == 7
    assert planned_engine_bytes(plan(rollout_parts=between, train_parts={ENGINE_BESIDE_PART: 11})) == 11


def test_sequences_at_once_counts_whole_sequences_of_the_group():
    per_seq = (100 + 16) * 10
    assert vllm_sizing.sequences_at_once(per_seq * 5 + 9, 10, 100, sequences=8) == 5
    assert vllm_sizing.sequences_at_once(per_seq * 50, 10, 100, sequences=8) == 8  # never more than the rollout's
    assert vllm_sizing.sequences_at_once(per_seq - 1, 10, 100, sequences=8) == 1  # at least one
    # a tensor-parallel group's cache holds the group's sequences: this process gets its share
    assert vllm_sizing.sequences_at_once(per_seq * 6, 10, 100, sequences=8, tensor_parallel_size=2) == 3


@pytest.mark.parametrize("kv_fraction", [1.0, 0.25])
def test_an_engine_whose_kv_cache_is_short_of_the_rollout_holds_whole_sequences_only(monkeypatch, kv_fraction):
    from lightning_rl.plugins.memory_plan import MemoryPlan
    from lightning_rl.rollout import vllm as vllm_mod

    built = {}

    class Recorder:
        def __init__(self, policy, eos, pad, max_len, max_num_seqs, settings, weights_root):
            built.update(max_len=max_len, max_num_seqs=max_num_seqs, kv=settings.kv_cache_bytes)

    monkeypatch.setattr(vllm_mod, "VLLMEngine", Recorder)
    module = rollout_grpo()
    module.configure_model()
    shape = module.training_shape()
    cb = VLLMRollout(overlap=False)
    per_token = kv_bytes_per_token(module.policy.config, 4)  # an fp32 engine for the tiny fp32 policy on a CPU
    whole_sequence = (cb.max_len(shape) + 16) * per_token
    kv = 3 * whole_sequence + 1
    plugin = MemoryAwarePrecision()
    plugin.memory_plan = MemoryPlan(budget_bytes=GIB, micro_batch_tokens=64, kv_cache_bytes=kv,
                                    kv_fraction=kv_fraction)
    cb._plugin = plugin
    cb.build_engine(module, 4)
    sequences = 4 * shape.num_generations
    assert built["kv"] == kv
    assert built["max_num_seqs"] == (sequences if kv_fraction == 1.0 else 3)


@pytest.mark.parametrize("own_process", [False, True])
def test_the_trainers_allocator_grows_its_segments_only_beside_an_engine_process(monkeypatch, own_process):
    """vLLM's sleep mode (an engine in the trainer's process) does not allow expandable segments."""
    from lightning_rl.callbacks import vllm_rollout
    from lightning_rl.rollout.vllm_process import VLLMProcessEngine

    turned_on, turned_off = [], []
    monkeypatch.setattr(vllm_rollout, "enable_expandable_segments", lambda device: turned_on.append(device) or True)
    monkeypatch.setattr(vllm_rollout, "disable_expandable_segments", lambda: turned_off.append(True))

    def factory(module, n, seed):
        engine = FakeEngine(module, [])
        if own_process:  # the engine the callback builds with overlap when no factory is given
            engine.__class__ = type("FakeProcessEngine", (FakeEngine, VLLMProcessEngine), {})
        return engine

    cb = VLLMRollout(engine_factory=factory, overlap=True)
    module = rollout_grpo()
    module.configure_model()
    cb._create(SimpleNamespace(global_step=0), module, 2)
    assert cb.overlapping
    assert cb.expandable_segments is own_process and len(turned_on) == int(own_process)
    cb.shutdown()  # back to fixed segments: a later engine in this process may need vLLM's sleep mode
    assert not cb.expandable_segments and len(turned_off) == int(own_process)
    in_process = VLLMRollout(engine_factory=factory, overlap=False)
    in_process._create(SimpleNamespace(global_step=0), module, 2)
    assert not in_process.expandable_segments and len(turned_on) == int(own_process)
