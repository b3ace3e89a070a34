"""MemoryPlanError's "What to change": only changes that would help this run, the one that frees the most first."""

import pytest
import torch
from helpers import SAY_ROWS, TINY, plugin_trainer, tiny_grpo
from test_precision_plugin import QWEN_05B

from lightning_rl import MemoryAwarePrecision, PromptDataModule
from lightning_rl.plugins import MemoryPlanError, ModelMemory, RolloutNeeds, plan_memory
from lightning_rl.plugins.memory_plan import GiB, MiB, RunSettings
from lightning_rl.plugins.shape_plan import plan_for_shape
from lightning_rl.shapes import TrainingShape

LORA = ModelMemory(1_000_000, 4_000_000, 500_000_000, 10**9)  # adapters on a 0.5B bf16 base
FULL = ModelMemory(500_000_000, 2 * 10**9, 0, 0)  # a 0.5B full fine-tune: 2 GB weights, 2 GB grads, 4 GB Adam
DONE = RunSettings(adapters=True, gradient_checkpointing=True, offload_checkpoints=True, cuda=True, quantized=True)


def _advice(**kw) -> list[str]:
    """The "What to change" lines of the MemoryPlanError ``plan_memory(**kw)`` raises."""
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(**kw)
    text = str(err.value)
    return [line[4:] for line in text.split("What to change:\n", 1)[1].splitlines()]


def _index(advice: list[str], words: str) -> int:
    return next(i for i, line in enumerate(advice) if words in line)


def test_a_budget_below_the_fixed_parts_says_so_first_and_suggests_nothing_already_done():
    """memory_budget=24 (bytes: the user meant GiB) for a LoRA run with checkpointing on a CPU."""
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(budget_bytes=24, model=LORA, activation_bytes_per_token=1000, sequence_tokens=64,
                    settings=RunSettings(gradient_checkpointing=True, cuda=False))
    text = str(err.value)
    assert text.startswith("the train phase does not fit in the memory budget of 24 bytes:")
    advice = text.split("What to change:\n", 1)[1].splitlines()
    assert advice[0].startswith("  - the reserve and the weights alone take 1.19 GiB, more than the budget: raise "
                                "memory_budget (now 24 bytes; a value > 1 is bytes, <= 1 a fraction of the device")
    assert "lower reserved_bytes (now 256.0 MiB)" in advice[0]
    assert len(advice) == 1  # quantize needs CUDA; LoRA, checkpointing: done already; nothing else can help
    for done in ("lora=", "gradient_checkpointing=True", "offload_checkpoints", "optimizer_states='cpu'", "quantize"):
        assert done not in text, done


def test_fixes_are_ordered_by_what_they_free_and_the_budget_comes_last_when_it_is_not_the_cause():
    kw = dict(budget_bytes=8 * 10**9 + 40 * 10**6, model=FULL, sequence_tokens=512, reserved_bytes=0)
    # 2 + 2 + 4 GB of weights, gradients and Adam states leave 40 MB: the states and gradients are the big parts
    states_first = _advice(activation_bytes_per_token=100_000, **kw)
    assert _index(states_first, "lora=") < _index(states_first, "optimizer_states='cpu'") < \
        _index(states_first, "gradient_checkpointing=True")
    assert "raise memory_budget" in states_first[-1] and "reserved_bytes" not in states_first[-1]
    assert not any("quantize" in line for line in states_first)  # no frozen weights to quantize
    # the activations of one sequence (8 GB) dominate: checkpointing first
    activations_first = _advice(activation_bytes_per_token=16_000_000, **kw)
    assert activations_first[0].startswith("turn on gradient_checkpointing=True")


def test_changes_the_run_has_made_are_left_out():
    advice = _advice(budget_bytes=2 * GiB, model=LORA, activation_bytes_per_token=10**6, sequence_tokens=1024,
                     optimizer_device_bytes=MiB, settings=DONE)
    assert [line.split(" (")[0].split(",")[0] for line in advice] == ["use shorter sequences", "raise memory_budget"]
    on_cpu = _advice(budget_bytes=4 * GiB, model=FULL, activation_bytes_per_token=10**6, sequence_tokens=1024,
                     settings=RunSettings(gradient_checkpointing=True, cuda=False))
    assert not any(w in line for line in on_cpu for w in ("optimizer_states='cpu'", "offload_checkpoints", "quantize"))
    assert any("lora=" in line for line in on_cpu)  # all weights train: LoRA would help


def test_rollout_advice_leaves_out_offloading_done_and_lora_on():
    needs = dict(kv_bytes_per_token=12288, tokens=64 * 8 * 1024, engine_weight_bytes=10**9, overhead_bytes=GiB)
    kw = dict(budget_bytes=8 * GiB, model=LORA, activation_bytes_per_token=50_000, sequence_tokens=1024,
              optimizer_bytes=GiB)
    on_device = _advice(rollout=RolloutNeeds(**needs), settings=RunSettings(cuda=True), **kw)
    assert _index(on_device, "num_generations") < _index(on_device, "offload_optimizer=True")
    assert not any("lora=" in line for line in on_device)  # adapters train already (inferred from the model)
    offloaded = _advice(rollout=RolloutNeeds(**needs, offload_optimizer=True), settings=RunSettings(cuda=True), **kw)
    assert not any("offload_optimizer" in line for line in offloaded)
    assert "raise memory_budget" in offloaded[-1]
    small = _advice(rollout=RolloutNeeds(**needs), **{**kw, "budget_bytes": 3 * GiB})  # the train phase fits
    assert small[0].startswith("the reserve, the weights and the engine's weights and workspace alone take 3.12 GiB, "
                               "more than the budget: raise memory_budget (now 3221225472 bytes;")


def test_plan_for_shape_passes_what_the_module_does_to_the_advice():
    shape = TrainingShape(QWEN_05B, 1024, 512, 512, gradient_checkpointing=True, offload_checkpoints=True)
    with pytest.raises(MemoryPlanError) as err:
        plan_for_shape(shape, FULL, budget_bytes=6 * GiB, compute_dtype=torch.bfloat16,
                       optimizer_bytes=4 * 10**9, cuda=True, quantized=True, reserved_bytes=0)
    text = str(err.value)
    assert "optimizer_states='cpu'" in text and "lora=" in text
    for done in ("gradient_checkpointing=True", "offload_checkpoints", "quantize"):
        assert done not in text, done


def test_a_fit_with_a_budget_in_bytes_names_memory_budget_first():
    """The bug bash's run: LoRA, gradient checkpointing, ``memory_budget=24`` meant as GiB."""
    module = tiny_grpo(model_config=TINY, micro_batch_size=4, lora={"r": 4, "lora_alpha": 8},
                       gradient_checkpointing=True)
    with pytest.raises(MemoryPlanError) as err:
        plugin_trainer(MemoryAwarePrecision(memory_budget=24), steps=1).fit(
            module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
    advice = str(err.value).split("What to change:\n", 1)[1].splitlines()
    assert "raise memory_budget (now 24 bytes; a value > 1 is bytes" in advice[0] and "reserved_bytes" in advice[0]
    assert not any("lora=" in line or "gradient_checkpointing=True" in line for line in advice)
