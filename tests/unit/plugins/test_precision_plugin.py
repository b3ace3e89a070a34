"""MemoryAwarePrecision on CPU without a fit: dtypes, autocast, the memory plan's arithmetic, offloading, its state.

Its fits are in tests/integration/plugins/test_precision_plugin_fit.py.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, tiny_grpo
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn

from lightning_rl import MemoryAwarePrecision
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.plugins import (
    MemoryAwareFSDPPrecision,
    MemoryPlan,
    MemoryPlanError,
    ModelMemory,
    OptimizerOffloader,
    RolloutNeeds,
    host_residency,
    plan_memory,
    streamed_states,
    weight_storage,
)
from lightning_rl.plugins.memory_plan import CONTEXT_PART, GiB, activation_bytes_per_token, kv_bytes_per_token
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.plugins.shape_plan import plan_for_shape
from lightning_rl.shapes import TrainingShape

QWEN_05B = SimpleNamespace(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936)


def _grpo(**kw):
    return tiny_grpo(**{"model_config": TINY, "micro_batch_size": 4, **kw})


# ----------------------------------------------------------------------------- dtypes
def test_lora_frozen_base_in_bf16_adapters_in_fp32():
    net, _ = load_policy("tiny-llama", TINY)
    net = apply_lora(net, {"r": 4, "lora_alpha": 8})
    MemoryAwarePrecision().convert_module(net)
    for name, p in net.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert any(p.requires_grad for p in net.parameters())
    assert all(b.dtype == torch.float32 for n, b in net.named_buffers() if "inv_freq" in n)  # buffers untouched


def test_trainable_weights_become_fp32_masters_and_float32_keeps_frozen():
    net, _ = load_policy("tiny-llama", TINY, dtype="bfloat16")
    net.model.embed_tokens.weight.requires_grad_(False)  # tied with the head: frozen, as one parameter
    MemoryAwarePrecision(frozen_dtype="float32").convert_module(net)
    assert net.model.embed_tokens.weight.dtype == torch.float32
    assert net.lm_head.weight is net.model.embed_tokens.weight
    assert net.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    net2, _ = load_policy("tiny-llama", TINY)
    net2.model.layers[0].requires_grad_(False)
    MemoryAwarePrecision().convert_module(net2)
    assert net2.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert net2.model.norm.weight.dtype == torch.float32


def test_frozen_reference_copy_is_converted():
    module = _grpo(beta=0.1)
    module.configure_model()
    MemoryAwarePrecision().convert_module(module)
    ref = module._frozen_reference[0]
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------- autocast
def test_autocast_and_cache_cleared_when_grad_mode_changes():
    plugin = MemoryAwarePrecision()
    lin = nn.Linear(8, 8)
    plugin.convert_module(lin)
    x = torch.randn(4, 8)
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with torch.no_grad():
            old = lin(x)
        assert plugin.cache_clears == 0
        y = lin(x)  # no_grad -> grad: the cache is cleared first
        assert plugin.cache_clears == 1
    assert old.dtype == y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    plugin.teardown()
    assert not plugin._hooks


def test_bad_arguments_and_missing_bitsandbytes(monkeypatch):
    with pytest.raises(ValueError, match="compute_dtype"):
        MemoryAwarePrecision(compute_dtype="float32")
    with pytest.raises(ValueError, match="frozen_dtype"):
        MemoryAwarePrecision(frozen_dtype="int8")
    monkeypatch.setattr(weight_storage, "_BNB_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install bitsandbytes"):
        MemoryAwarePrecision(quantize="nf4")


def test_fsdp_variant_is_an_fsdp_precision_and_keeps_dtypes():
    plugin = MemoryAwareFSDPPrecision()
    assert isinstance(plugin, FSDPPrecision) and isinstance(plugin, MemoryAwarePrecision)
    assert plugin.mixed_precision_config.param_dtype == torch.bfloat16
    lin = nn.Linear(4, 4).requires_grad_(False)
    plugin.convert_module(lin)
    assert lin.weight.dtype == torch.float32  # FSDP units need one dtype: storage is FSDP's business
    MemoryAwareFSDPPrecision(convert_frozen=True).convert_module(lin)
    assert lin.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantize"):
        MemoryAwareFSDPPrecision(quantize="nf4")


# ----------------------------------------------------------------------------- plan arithmetic
def test_kv_and_activation_estimates_for_a_qwen_shape():
    assert kv_bytes_per_token(QWEN_05B, 2) == 2 * 24 * 2 * 64 * 2  # 12 KiB per token
    full = activation_bytes_per_token(QWEN_05B, 2)
    assert full == 24 * (10 * 896 + 2 * 128 + 5 * 4864) * 2
    per_layer = (10 * 896 + 2 * 128 + 5 * 4864) * 2
    checkpointed = activation_bytes_per_token(QWEN_05B, 2, gradient_checkpointing=True)
    assert checkpointed == 24 * 896 * 4 + 4 * per_layer < full / 4  # fp32 layer inputs + 4 recomputed-layer copies
    offloaded = activation_bytes_per_token(QWEN_05B, 2, gradient_checkpointing=True, offload_checkpoints=True)
    assert offloaded == 2 * 896 * 4 + 4 * per_layer  # two layers' inputs on the device, the rest in host memory
    # offloading means nothing without checkpointing (every activation stays for the backward)
    assert activation_bytes_per_token(QWEN_05B, 2, offload_checkpoints=True) == full


def _model(trainable=500_000_000, frozen=0):
    return ModelMemory(trainable, trainable * 4, frozen, frozen * 2)


def test_plan_fits_and_picks_tokens_and_kv_budget():
    model = _model()  # 0.5B full fine-tune: 2 GB weights, 2 GB grads, 4 GB Adam
    rollout = RolloutNeeds(kv_bytes_per_token=12288, tokens=16 * 8 * 512, engine_weight_bytes=10**9,
                           overhead_bytes=GiB, headroom=1.2, offload_optimizer=True)
    plan = plan_memory(budget_bytes=20 * GiB, model=model, activation_bytes_per_token=100_000, sequence_tokens=512,
                       rollout=rollout, reserved_bytes=0)
    free = 20 * GiB - 8 * 10**9
    assert plan.micro_batch_tokens == (free // 100_000) // 512 * 512
    assert plan.micro_batch_sequences(512) == plan.micro_batch_tokens // 512
    assert plan.train_peak_bytes <= plan.budget_bytes
    assert plan.kv_cache_bytes == math.ceil(16 * 8 * 512 * 12288 * 1.2)  # the need with headroom, not all free
    assert plan.rollout_parts["optimizer states"] == 0  # offloaded while the engine is awake
    assert "KV cache" in plan.summary() and "activations" in plan.summary()
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
    capped = plan_memory(budget_bytes=20 * GiB, model=model, activation_bytes_per_token=100_000,
                         sequence_tokens=512, max_micro_batch_tokens=4 * 512, reserved_bytes=0)
    assert capped.micro_batch_tokens == 4 * 512 and capped.kv_cache_bytes is None


def test_plan_refuses_training_that_cannot_fit_and_names_the_parts():
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(budget_bytes=int(7.5 * GiB), model=_model(), activation_bytes_per_token=100_000,
                    sequence_tokens=512)
    msg = str(err.value)
    for part in ("train phase", "trainable weights", "gradients", "optimizer states", "activations of one sequence",
                 "What to change", "lora=", "gradient_checkpointing=True", "offload_checkpoints=True"):
        assert part in msg
    assert "1.86 GiB" in msg  # 500M fp32 weights


def test_plan_refuses_a_rollout_that_cannot_fit_unless_optimizer_is_offloaded():
    model = _model(10_000_000, 1_000_000_000)  # LoRA on a 1B base: 2 GB of bf16 weights
    needs = dict(kv_bytes_per_token=12288, tokens=64 * 8 * 1024, engine_weight_bytes=2 * 10**9, overhead_bytes=GiB)
    kw = dict(budget_bytes=12 * GiB, model=model, activation_bytes_per_token=50_000, sequence_tokens=1024,
              optimizer_bytes=4 * GiB)
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(rollout=RolloutNeeds(**needs, offload_optimizer=False), **kw)
    msg = str(err.value)
    for part in ("rollout phase", "KV cache (524288 tokens)", "engine weights", "optimizer states: 4.00 GiB",
                 "offload_optimizer=True", "num_generations"):
        assert part in msg
    plan = plan_memory(rollout=RolloutNeeds(**needs, offload_optimizer=True), **kw)
    assert plan.kv_cache_bytes >= 64 * 8 * 1024 * 12288


# ----------------------------------------------------------------------------- offload
def test_offload_and_restore_leave_optimizer_states_bit_identical():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    net(torch.randn(8, 16)).pow(2).mean().backward()  # gradients present too
    before = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items()}
    grads = [p.grad.clone() for p in net.parameters()]
    originals = {(id(p), k): v for p, s in opt.state.items() for k, v in s.items()}
    off = OptimizerOffloader(target="cpu")  # CPU -> CPU simulates the device -> pinned-host path
    moved = off.offload([opt], source="cpu")
    assert off.is_offloaded and moved > 0
    assert all(p.grad is None for p in net.parameters())
    assert all(v is not originals[(id(p), k)] for p, s in opt.state.items() for k, v in s.items())
    with pytest.raises(RuntimeError, match="already offloaded"):
        off.offload([opt], source="cpu")
    assert off.restore() == moved and not off.is_offloaded
    for p, s in opt.state.items():
        for k, v in s.items():
            ref = before[(id(p), k)]
            assert v.dtype == ref.dtype and v.device == ref.device
            assert torch.equal(v.view(torch.uint8) if v.dim() else v, ref.view(torch.uint8) if ref.dim() else ref)
    for p, g in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    opt.step()  # the optimizer still works on the restored states
    off.release_buffers()


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip():
    plugin = MemoryAwarePrecision()
    plugin.memory_plan = plan_memory(budget_bytes=4 * GiB, model=_model(1000, 1000), activation_bytes_per_token=10,
                                     sequence_tokens=8)
    plugin.planned_micro_batch_size = 3
    plugin.memory_stats = {"train": {"peak": 123}}
    state = plugin.state_dict()
    other = MemoryAwarePrecision()
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.warns(UserWarning, match="frozen_dtype"):
        MemoryAwarePrecision(frozen_dtype="float32").load_state_dict(state)


@pytest.mark.parametrize("fits_without", [True, False])
def test_optimizer_offload_is_automatic_only_when_the_rollout_needs_the_room(monkeypatch, fits_without):
    plugin = MemoryAwarePrecision()
    plugin.device_type = "cuda"
    calls = []

    def make_plan(module, optimizers, device):
        calls.append(plugin.offload_enabled)
        if not plugin.offload_enabled and not fits_without:
            raise MemoryPlanError("the rollout phase does not fit")
        return "plan"

    monkeypatch.setattr(plugin, "make_plan", make_plan)
    assert plugin.plan_with_auto_offload(None, [], torch.device("cuda")) == "plan"
    assert calls == ([False] if fits_without else [False, True])
    assert plugin.offload_enabled is (not fits_without)
    explicit = MemoryAwarePrecision(offload_optimizer=False)
    explicit.device_type = "cuda"
    monkeypatch.setattr(explicit, "make_plan", lambda *a: (_ for _ in ()).throw(MemoryPlanError("no")))
    with pytest.raises(MemoryPlanError):  # an explicit setting is kept, and the plan's error says what to change
        explicit.plan_with_auto_offload(None, [], torch.device("cuda"))


@pytest.mark.parametrize("setting", ["auto", "device"])
def test_auto_optimizer_states_stream_from_cpu_only_when_the_plan_needs_it(monkeypatch, caplog, setting):
    plugin = MemoryAwarePrecision(optimizer_states=setting)
    plugin.device_type = "cuda"
    opt = torch.optim.AdamW(nn.Linear(4, 4).parameters())
    calls = []

    def make_plan(module, optimizers, device):
        calls.append((plugin.streams_optimizer_states, plugin.offload_enabled))
        if not plugin.streams_optimizer_states:
            raise MemoryPlanError("the train phase does not fit: optimizer states 2 GiB")
        return "plan"

    monkeypatch.setattr(plugin, "make_plan", make_plan)
    if setting == "device":  # the user's choice stands; the plan's error (with its fixes) reaches them
        with pytest.raises(MemoryPlanError):
            plugin.plan_with_auto_offload(None, [opt], torch.device("cuda"))
        assert not plugin.streams_optimizer_states
        return
    assert not plugin.streams_optimizer_states  # nothing decided before the plan
    assert plugin.plan_with_auto_offload(None, [opt], torch.device("cuda")) == "plan"
    assert calls == [(False, False), (True, False)]  # streaming came before offloading during rollouts
    assert plugin.streams_optimizer_states and "streamed through each optimizer step" in caplog.text
    fits = MemoryAwarePrecision()
    fits.device_type = "cuda"
    monkeypatch.setattr(fits, "make_plan", lambda *a: "plan")
    assert fits.plan_with_auto_offload(None, [opt], torch.device("cuda")) == "plan"
    assert not fits.streams_optimizer_states  # a plan that fits keeps the states on the device


def test_auto_optimizer_states_stay_on_the_device_for_an_optimizer_or_shards_that_cannot_stream(monkeypatch):
    plugin = MemoryAwarePrecision()
    plugin.device_type = "cuda"
    lbfgs = torch.optim.LBFGS(nn.Linear(4, 4).parameters())
    monkeypatch.setattr(plugin, "make_plan", lambda *a: (_ for _ in ()).throw(MemoryPlanError("no room")))
    with pytest.raises(MemoryPlanError, match="no room"):
        plugin.plan_with_auto_offload(None, [lbfgs], torch.device("cuda"))
    assert not plugin.streams_optimizer_states
    monkeypatch.setattr(host_residency, "is_dtensor", lambda p: True)  # FSDP2 shards: each rank steps its own
    with pytest.raises(MemoryPlanError, match="no room"):
        plugin.plan_with_auto_offload(None, [torch.optim.AdamW(nn.Linear(4, 4).parameters())], torch.device("cuda"))
    assert not plugin.streams_optimizer_states
    with pytest.raises(ValueError, match="'auto', 'device' or 'cpu'"):
        MemoryAwarePrecision(optimizer_states="disk")


class _ShapedStub:
    """A module that reports a generating shape and records whether the plugin asked it to offload checkpoints."""

    def __init__(self, offloads=True):
        self.offloads, self.asked, self.kept = offloads, 0, 0

    def training_shape(self):
        return SimpleNamespace(generates=True)

    def apply_micro_batch_plan(self, micro_batch_tokens):
        pass

    def offload_checkpoints_beside_engine(self):
        self.asked += 1
        return self.offloads

    def keep_checkpoints_on_device(self):
        self.kept += 1


class _Engine:
    def __init__(self, beside):
        self.beside = beside

    def rollout_memory(self, shape):
        return RolloutMemory(engine_weight_bytes=GiB, beside_training_bytes=self.beside)


@pytest.mark.parametrize(("setting", "beside", "device", "chunk", "streams", "asks"), [
    ("auto", GiB, "cuda", 100, True, 1),     # an engine process beside the update: both levers
    ("auto", 0, "cuda", 100, False, 0),      # the engine sleeps during the update: neither
    ("auto", GiB, "cpu", 100, False, 0),     # nothing to shrink on a CPU
    ("auto", GiB, "cuda", 1024, False, 1),   # states (160 bytes) no larger than one chunk: not worth streaming
    ("device", GiB, "cuda", 100, False, 1),  # the user's choice for the states stands
])
def test_beside_an_engine_that_generates_during_the_update_states_stream_and_checkpoints_offload(
        setting, beside, device, chunk, streams, asks):
    plugin = MemoryAwarePrecision(optimizer_states=setting, step_chunk_bytes=chunk)
    plugin.register_rollout(_Engine(beside))
    module = _ShapedStub()
    opt = torch.optim.AdamW(nn.Linear(4, 4).parameters())  # 20 parameters: 160 bytes of AdamW states
    plugin.shrink_beside_engine(module, [opt], torch.device(device))
    assert plugin.streams_optimizer_states is streams
    assert module.asked == asks
    lbfgs = MemoryAwarePrecision(step_chunk_bytes=100)  # an optimizer that cannot stream keeps its states
    lbfgs.register_rollout(_Engine(GiB))
    lbfgs.shrink_beside_engine(_ShapedStub(), [torch.optim.LBFGS(nn.Linear(4, 4).parameters())],
                               torch.device("cuda"))
    assert not lbfgs.streams_optimizer_states


@pytest.mark.parametrize(("budget", "undone"), [(None, True), (4 * GiB, False)], ids=["whole-device", "budget"])
def test_an_engine_that_leaves_the_update_takes_the_shrink_back_unless_a_budget_needs_it(budget, undone):
    plugin = MemoryAwarePrecision(step_chunk_bytes=100, memory_budget=budget)
    plugin.register_rollout(_Engine(GiB))
    module = _ShapedStub()
    opt = torch.optim.AdamW(nn.Linear(4, 4).parameters())
    plugin._optimizers = [opt]
    plugin.shrink_beside_engine(module, [opt], torch.device("cuda"))
    assert plugin.streams_optimizer_states and module.asked == 1
    plugin.engine_leaves_the_update(module)  # its process failed to start: the engine generates between updates
    assert plugin.streams_optimizer_states is not undone
    assert module.kept == int(undone)
    plugin.engine_leaves_the_update(module)  # once
    assert module.kept == int(undone)
    chosen = MemoryAwarePrecision(optimizer_states="cpu")  # the user's streaming is not the shrink's to undo
    chosen.register_rollout(_Engine(GiB))
    chosen.shrink_beside_engine(_ShapedStub(), [opt], torch.device("cuda"))
    chosen.engine_leaves_the_update(_ShapedStub())
    assert chosen.streams_optimizer_states


def test_plan_for_shape_without_an_engine_or_with_one_sized_by_a_gpu_fraction():
    shape = TrainingShape(model_config=QWEN_05B, sequence_tokens=512, max_prompt_tokens=256, max_new_tokens=256,
                          generates=True, num_generations=8, micro_batch_size=4)
    kw = dict(budget_bytes=40 * GiB, compute_dtype=torch.bfloat16, optimizer_bytes=4 * GiB, reserved_bytes=0)
    in_step = plan_for_shape(shape, _model(), prompts_per_step=16, **kw)
    assert in_step.rollout_parts["engine weights"] == 0  # transformers generates with the policy itself
    assert in_step.kv_cache_bytes == 16 * 8 * 512 * kv_bytes_per_token(QWEN_05B, 2)
    assert in_step.micro_batch_tokens == 4 * 512  # the fixed micro-batch bounds the plan
    fraction = RolloutMemory(engine_weight_bytes=GiB, weights_kept_asleep_bytes=GiB, sized_by_gpu_fraction=True)
    plan = plan_for_shape(shape, _model(), rollout=fraction, **kw)
    assert plan.rollout_parts == {} and plan.kv_cache_bytes is None  # vLLM takes its fraction itself
    assert plan.train_parts["engine weights (kept while the engine sleeps)"] == GiB
    offline = plan_for_shape(TrainingShape(QWEN_05B, 512, 512, 0), _model(), rollout=fraction, **kw)
    assert offline.rollout_parts == {} and "engine weights (kept while the engine sleeps)" in offline.train_parts


def test_the_shapes_micro_batch_token_limit_bounds_an_automatic_micro_batch_only():
    kw = dict(budget_bytes=40 * GiB, compute_dtype=torch.bfloat16, optimizer_bytes=GiB, reserved_bytes=0,
              prompts_per_step=16)
    auto = TrainingShape(model_config=QWEN_05B, sequence_tokens=500, max_prompt_tokens=250, max_new_tokens=250,
                         generates=True, num_generations=8)
    unbounded = plan_for_shape(auto, _model(), **kw).micro_batch_tokens
    assert unbounded > 20_000  # 40 GiB hold far more than the limit below
    limited = plan_for_shape(dataclasses.replace(auto, max_micro_batch_tokens=16384), _model(), **kw)
    assert limited.micro_batch_tokens == 16000  # whole 500-token sequences within the limit
    assert limited.train_parts["activations (16000 tokens)"] == 16000 * limited.activation_bytes_per_token
    fixed = dataclasses.replace(auto, max_micro_batch_tokens=16384, micro_batch_size=40)
    assert plan_for_shape(fixed, _model(), **kw).micro_batch_tokens == 40 * 500  # the user's size is not capped


# ----------------------------------------------------------------------------- memory outside PyTorch
def test_plan_counts_the_memory_outside_pytorch_in_both_phases():
    model = _model(10_000_000, 1_000_000_000)
    kw = dict(budget_bytes=6 * GiB, model=model, activation_bytes_per_token=50_000, sequence_tokens=512,
              reserved_bytes=0, rollout=RolloutNeeds(kv_bytes_per_token=12288, tokens=8 * 512,
                                                     engine_weight_bytes=0, overhead_bytes=GiB, headroom=100.0))
    plain = plan_memory(**kw)
    ctx = 700 * 2**20
    counted = plan_memory(**kw, context_bytes=ctx)
    assert CONTEXT_PART not in plain.train_parts and CONTEXT_PART not in plain.rollout_parts
    assert counted.train_parts[CONTEXT_PART] == counted.rollout_parts[CONTEXT_PART] == ctx
    # the room it takes comes out of the micro-batch and of the KV cache (which was using all that was left)
    assert plain.micro_batch_tokens - counted.micro_batch_tokens >= (ctx // 50_000) // 512 * 512
    assert plain.kv_cache_bytes - counted.kv_cache_bytes == ctx
    assert counted.train_peak_bytes <= 6 * GiB and counted.rollout_peak_bytes <= 6 * GiB
    with pytest.raises(MemoryPlanError, match="CUDA context and libraries"):
        plan_memory(**{**kw, "budget_bytes": int(2.6 * GiB)}, context_bytes=GiB)


def test_context_bytes_setting_measurement_and_fallback(monkeypatch):
    from lightning_rl.plugins import device_context

    cuda = torch.device("cuda", 0)
    assert device_context.context_bytes_for(torch.device("cpu"), None) == 0
    assert device_context.context_bytes_for(cuda, 123) == 123  # the user's figure wins
    monkeypatch.setattr(device_context, "memory_outside_torch", lambda device: 456 * 2**20)
    assert device_context.context_bytes_for(cuda, None) == 456 * 2**20
    monkeypatch.setattr(device_context, "memory_outside_torch", lambda device: None)  # no NVML, or not listed
    assert device_context.context_bytes_for(cuda, None) == device_context.DEFAULT_CONTEXT_BYTES
    with pytest.raises(ValueError, match="context_bytes must be >= 0"):
        MemoryAwarePrecision(context_bytes=-1)


def test_a_cpu_plan_counts_no_context_and_a_given_one_appears_in_the_plan(monkeypatch):
    grpo = _grpo(lora=None)
    grpo.configure_model()
    opt = torch.optim.AdamW(grpo.policy.parameters())
    cpu = MemoryAwarePrecision(memory_budget=4 * GiB)
    plan = cpu.make_plan(grpo, [opt], torch.device("cpu"))
    assert CONTEXT_PART not in plan.train_parts and CONTEXT_PART not in plan.rollout_parts  # nothing counted
    given = MemoryAwarePrecision(memory_budget=4 * GiB, context_bytes=300 * 2**20)
    plan = given.make_plan(grpo, [opt], torch.device("cpu"))
    assert plan.train_parts[CONTEXT_PART] == 300 * 2**20
    assert "CUDA context and libraries (outside PyTorch): 300.0 MiB" in plan.summary()


# ----------------------------------------------------------------------------- a rollout in waves
def test_plan_gives_a_short_kv_cache_only_with_waves_and_one_whole_sequence():
    needs = dict(kv_bytes_per_token=1024, tokens=2**20, headroom=1.2)  # one rollout: 1 GiB of KV cache
    kw = dict(model=_model(1_000_000, 0), activation_bytes_per_token=1000, sequence_tokens=512, reserved_bytes=0)
    static = 3 * 4_000_000 + 2 * 4_000_000  # weights, gradients, AdamW's two moments (fp32)
    budget = static + GiB // 2
    with pytest.raises(MemoryPlanError, match="the KV cache needs 1.00 GiB"):
        plan_memory(budget_bytes=budget, rollout=RolloutNeeds(**needs, min_tokens=600), **kw)
    plan = plan_memory(budget_bytes=budget, rollout=RolloutNeeds(**needs, min_tokens=600), waves=True, **kw)
    assert plan.rollout_peak_bytes == budget  # the KV cache takes all that is left
    assert plan.kv_fraction == pytest.approx(plan.kv_cache_bytes / GiB) and 0.49 < plan.kv_fraction < 0.51
    assert "generated in waves" in plan.summary()
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(MemoryPlanError, match="generating in waves needs"):  # not even one whole sequence fits
        plan_memory(budget_bytes=budget, rollout=RolloutNeeds(**needs, min_tokens=2**19 + 2**14), waves=True, **kw)
    with pytest.raises(MemoryPlanError):  # an engine that cannot generate in waves (min_tokens 0)
        plan_memory(budget_bytes=budget, rollout=RolloutNeeds(**needs), waves=True, **kw)
    whole = plan_memory(budget_bytes=budget + GiB, rollout=RolloutNeeds(**needs, min_tokens=600), waves=True, **kw)
    assert whole.kv_fraction == 1.0 and whole.kv_cache_bytes == math.ceil(GiB * 1.2)  # the need and its headroom


class _KVHungryRollout:
    """A rollout provider whose one rollout needs a 1 GiB KV cache; ``least`` tokens make one whole sequence."""

    def __init__(self, least):
        self.least = least

    def rollout_memory(self, shape):
        return RolloutMemory(engine_weight_bytes=0, kv_bytes_per_token=1024, kv_tokens=2**20, headroom=1.0,
                             min_kv_tokens=self.least)


def test_the_plugin_generates_in_waves_last_and_says_what_holds_the_rollout_whole(caplog):
    grpo = _grpo(lora=None)
    grpo.configure_model()
    opt = torch.optim.AdamW(grpo.policy.parameters())
    cpu = torch.device("cpu")
    roomy = MemoryAwarePrecision(memory_budget=4 * GiB, engine_overhead_bytes=0, reserved_bytes=0)
    roomy._rollout = _KVHungryRollout(600)
    plan = roomy.plan_with_auto_offload(grpo, [opt], cpu)
    assert plan.kv_fraction == 1.0 and plan.kv_cache_bytes == GiB
    budget = plan.rollout_peak_bytes - GiB // 2  # half the KV cache short
    tight = MemoryAwarePrecision(memory_budget=budget, engine_overhead_bytes=0, reserved_bytes=0)
    tight._rollout = _KVHungryRollout(600)
    with caplog.at_level("WARNING"):
        plan = tight.plan_with_auto_offload(grpo, [opt], cpu)
    assert plan.kv_fraction == pytest.approx(0.5, abs=0.01) and plan.rollout_peak_bytes <= budget
    warning = next(r.getMessage() for r in caplog.records if "waves" in r.getMessage())
    assert f"memory_budget={budget + GiB - plan.kv_cache_bytes}" in warning and "50%" in warning
    no_waves = MemoryAwarePrecision(memory_budget=budget, engine_overhead_bytes=0, reserved_bytes=0)
    no_waves._rollout = _KVHungryRollout(0)  # an engine that cannot generate in waves: the plan's own error
    with pytest.raises(MemoryPlanError, match="the rollout phase does not fit"):
        no_waves.plan_with_auto_offload(grpo, [opt], cpu)


class _GlobalNormSGD(torch.optim.Optimizer):
    """Per-parameter state, but every update is scaled by the norm of all gradients: chunks would change it."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad / norm, alpha=-g["lr"])


def test_auto_streams_only_torchs_per_parameter_optimizers_and_warns_when_told_to_stream_another(monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lightning_rl.plugins")
    coupled = _GlobalNormSGD(nn.Linear(4, 4).parameters())
    assert streamed_states.steps_per_parameter(torch.optim.AdamW(nn.Linear(2, 2).parameters()))
    assert not streamed_states.steps_per_parameter(coupled)
    assert not MemoryAwarePrecision._streamable([coupled])
    assert any("_GlobalNormSGD is not one of torch's optimizers" in r.getMessage() for r in caplog.records)
    assert MemoryAwarePrecision._streamable([torch.optim.AdamW(nn.Linear(2, 2).parameters())])
    plugin = MemoryAwarePrecision(optimizer_states="cpu")
    with pytest.warns(UserWarning, match="the results match optimizer_states='device' only when"):
        plugin.connect(nn.Linear(4, 4), [coupled], [])


def test_enforce_budget_caps_the_allocator_at_the_default_budget_too(monkeypatch):
    import types

    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda frac, device=None: calls.append(frac))
    device = types.SimpleNamespace(total_memory=80 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: device)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)

    class OnCuda(nn.Module):
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

    for kwargs, cap in ((dict(memory_budget=0.5), 0.5), ({}, 0.9), (dict(utilization=0.6), 0.6)):
        calls.clear()
        MemoryAwarePrecision(enforce_budget=True, context_bytes=0, **kwargs).connect(OnCuda(), [], [])
        assert calls == [pytest.approx(cap)], kwargs
