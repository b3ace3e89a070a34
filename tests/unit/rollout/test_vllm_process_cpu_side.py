"""The engine-in-its-own-process pieces that run without a GPU: spawning without re-running the script, when it
applies, and what the memory plan counts for it (the engine itself: tests/gpu/test_vllm_process.py)."""

import copy
import math
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import FakeEngine, rollout_grpo

from lightning_rl import MemoryAwarePrecision, VLLMRollout
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.plugins.memory_plan import GiB
from lightning_rl.plugins.rollout_memory import RolloutMemory
from lightning_rl.plugins.shape_plan import plan_for_shape
from lightning_rl.rollout import EngineSettings
from lightning_rl.rollout.vllm_internals import main_module_hidden
from lightning_rl.rollout.vllm_process import process_engine_unsupported_reason


def test_a_child_spawned_while_main_is_hidden_does_not_run_an_unguarded_script_again(tmp_path):
    marker = tmp_path / "runs.txt"
    script = tmp_path / "train.py"  # a training script without an `if __name__ == "__main__":` guard
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{__name__}}\\n")
        if __name__ == "__main__":
            from lightning_rl.rollout.vllm_internals import main_module_hidden
            hide = sys.argv[1] == "hide"
            ctx = multiprocessing.get_context("spawn")
            if hide:
                with main_module_hidden():
                    p = ctx.Process(target=os.getpid)
                    p.start()
                assert __file__ and __spec__ is None  # put back
            else:
                p = ctx.Process(target=os.getpid)
                p.start()
            p.join()
            assert p.exitcode == 0
    """))
    subprocess.run([sys.executable, str(script), "plain"], check=True, timeout=120)
    assert marker.read_text().split() == ["__main__", "__mp_main__"]  # what spawn does without the guard
    marker.unlink()
    subprocess.run([sys.executable, str(script), "hide"], check=True, timeout=120)
    assert marker.read_text().split() == ["__main__"]


def test_main_module_attributes_come_back_after_the_block():
    main = sys.modules["__main__"]
    before = (main.__dict__.get("__file__"), main.__dict__.get("__spec__"))
    with pytest.raises(KeyError):
        with main_module_hidden():
            assert "__file__" not in main.__dict__ and getattr(main, "__spec__", None) is None
            raise KeyError("the block failed")
    assert (main.__dict__.get("__file__"), main.__dict__.get("__spec__")) == before


def test_which_policies_can_feed_an_engine_in_its_own_process():
    net, _ = load_policy("tiny-llama", dtype="float32")
    assert "not on a CUDA device" in process_engine_unsupported_reason(net)
    lora = apply_lora(net, {"r": 4})
    assert "not on a CUDA device" in process_engine_unsupported_reason(lora)  # plain LoRA merges in the engine
    dora, _ = load_policy("tiny-llama", dtype="float32")
    assert "cannot merge this LoRA adapter (DoRA" in process_engine_unsupported_reason(
        apply_lora(dora, {"r": 4, "use_dora": True}))


def test_lora_settings_that_ask_for_an_engine_in_this_process_turn_overlap_off():
    from lightning_rl.rollout import EngineSettings

    module = rollout_grpo(lora={"r": 4, "lora_alpha": 8})
    module.configure_model()
    shared = VLLMRollout(settings=EngineSettings(share_base_weights=True))
    assert shared.overlap_off_reason(module).startswith("share_base_weights=True")
    adapter = VLLMRollout(settings=EngineSettings(lora_sync="adapter"))
    assert adapter.overlap_off_reason(module).startswith("lora_sync='adapter'")
    assert VLLMRollout().overlap_off_reason(module) == "the policy is not on a CUDA device"  # else: the device


def test_overlap_true_names_why_it_cannot_run_before_building_an_engine():
    module = rollout_grpo()
    module.configure_model()  # a CPU policy
    trainer = SimpleNamespace(global_step=0, strategy=None)
    cb = VLLMRollout(overlap=True)
    with pytest.raises(ValueError, match=r"overlap=True\) is impossible here: the policy is not on a CUDA device"):
        cb._create(trainer, module, 2)
    assert cb.engine is None
    assert VLLMRollout().overlap_off_reason(module) == "the policy is not on a CUDA device"  # automatic: off
    assert VLLMRollout(overlap=False).overlap_off_reason(module) == "overlap=False"
    factory = VLLMRollout(engine_factory=lambda m, n, s: FakeEngine(m, []))
    assert "engine_factory" in factory.overlap_off_reason(module)  # a custom engine overlaps only when asked


def test_the_plan_counts_an_engine_running_beside_the_update_in_the_train_phase():
    from lightning_rl.shapes import TrainingShape

    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=None,
                              strategy=SimpleNamespace(precision_plugin=None), datamodule=None)
    cb = VLLMRollout(prompts_per_step=2, overlap=True, engine_factory=lambda m, n, s: FakeEngine(m, []))
    cb.setup(trainer, module, "fit")
    memory = cb.rollout_memory(module.training_shape())
    kv = math.ceil(memory.kv_tokens * memory.headroom) * memory.kv_bytes_per_token
    assert memory.beside_training_bytes == memory.engine_weight_bytes + kv + GiB  # weights, KV cache, process
    assert memory.weights_kept_asleep_bytes == 0  # the engine never sleeps: its weights are in the figure above
    between = VLLMRollout(prompts_per_step=2, engine_factory=lambda m, n, s: FakeEngine(m, []))
    between.setup(trainer, module, "fit")
    assert between.rollout_memory(module.training_shape()).beside_training_bytes == 0

    from lightning_rl.plugins import MemoryAwarePrecision
    from lightning_rl.rollout import EngineSettings
    from lightning_rl.rollout.shared_weights import frozen_base_parameters

    lora = rollout_grpo(lora={"r": 4, "lora_alpha": 8})
    lora.configure_model()
    plugin = MemoryAwarePrecision()  # frozen weights in bf16, the engine's dtype: a merged base can be shared
    lora_trainer = SimpleNamespace(lightning_module=lora, precision="bf16-mixed", precision_plugin=plugin,
                                   strategy=SimpleNamespace(precision_plugin=plugin), datamodule=None)
    figures = {}
    for share in (False, True, None):
        settings = EngineSettings(share_merged_base=share)
        cb = VLLMRollout(prompts_per_step=2, overlap=True, settings=settings,
                         engine_factory=lambda m, n, s: FakeEngine(m, []))
        cb.setup(lora_trainer, lora, "fit")
        figures[share] = cb.rollout_memory(lora.training_shape()).beside_training_bytes
    auto = VLLMRollout(prompts_per_step=2)  # the engine process it would build (on a GPU) shares by default
    auto.overlap_off_reason = lambda *args: None
    auto.setup(lora_trainer, lora, "fit")
    figures["auto"] = auto.rollout_memory(lora.training_shape()).beside_training_bytes
    base = sum(p.numel() for p in frozen_base_parameters(lora.policy).values()) * 2
    assert figures[False] - figures[True] == base > 0  # the shared base counts once, as the trainer's frozen weights
    assert figures[None] == figures[False]  # automatic: a custom engine_factory's engine decides for itself
    assert figures["auto"] == figures[True]

    shape = TrainingShape(model_config=module.policy.config, sequence_tokens=64, max_prompt_tokens=32,
                          max_new_tokens=32, generates=True, num_generations=2, micro_batch_size=4)
    kw = dict(budget_bytes=40 * GiB, compute_dtype=torch.bfloat16, optimizer_bytes=GiB, reserved_bytes=0)
    model = SimpleNamespace(trainable_params=10, trainable_bytes=40, frozen_params=0, frozen_bytes=0,
                            total_params=10, total_bytes=40)
    beside = RolloutMemory(engine_weight_bytes=GiB, kv_bytes_per_token=1, kv_tokens=100,
                           beside_training_bytes=3 * GiB)
    plan = plan_for_shape(shape, model, rollout=beside, **kw)
    assert plan.train_parts["engine running beside the update (own process)"] == 3 * GiB
    plain = plan_for_shape(shape, model, rollout=RolloutMemory(engine_weight_bytes=GiB), **kw)
    assert plan.train_peak_bytes - plain.train_peak_bytes == 3 * GiB


def test_a_module_with_its_own_generate_rollout_generates_between_updates():
    from lightning_rl import GRPO

    class OwnRollouts(GRPO):
        def generate_rollout(self, prompts, engine=None, sampling=None, num_generations=None):
            return super().generate_rollout(prompts, engine, sampling, num_generations)

    module = rollout_grpo()
    own = OwnRollouts(**{k: v for k, v in module.hparams.items() if k != "reward_funcs"},
                      reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)])
    factory = dict(overlap=True, engine_factory=lambda m, n, s: FakeEngine(m, []))
    assert VLLMRollout(**factory).overlap_off_reason(module) is None
    assert VLLMRollout(**factory).overlap_off_reason(own) == "OwnRollouts overrides generate_rollout"


def test_the_engine_process_ends_itself_when_the_trainer_is_killed(tmp_path):
    """The watch the engine process starts at its first weight handles, on a plain child of a killed parent."""
    from lightning_rl.rollout.vllm_worker import process_alive

    pid_file = tmp_path / "child.pid"
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, signal, time

        def engine(parent):
            from lightning_rl.rollout.vllm_worker import exit_when_gone
            exit_when_gone(parent, interval_s=0.1)
            time.sleep(120)

        if __name__ == "__main__":
            p = multiprocessing.get_context("spawn").Process(target=engine, args=(os.getpid(),))
            p.start()
            open({str(pid_file)!r}, "w").write(str(p.pid))
            time.sleep(3)
            os.kill(os.getpid(), signal.SIGKILL)  # no teardown, as when the host kills a run
    """))
    proc = subprocess.run([sys.executable, str(script)], timeout=120)
    assert proc.returncode == -9
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(child)


def test_process_alive_and_a_watch_that_sees_its_process_go():
    from lightning_rl.rollout.vllm_worker import exit_when_gone, process_alive

    assert process_alive(os.getpid())
    short = subprocess.Popen([sys.executable, "-c", "pass"])
    short.wait()
    assert not process_alive(short.pid)
    exits = []
    exit_when_gone(short.pid, interval_s=0.01, exit_process=exits.append).join(5)
    assert exits == [1]


def test_only_modules_that_correct_a_stale_rollout_overlap():
    from lightning_rl import PPO

    factory = dict(overlap=True, engine_factory=lambda m, n, s: FakeEngine(m, []))
    ppo = PPO(reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)], model="tiny-llama",
              chat_template=False)
    assert "no importance weights" in VLLMRollout(**factory).overlap_off_reason(ppo)
    uncorrected = rollout_grpo(importance_sampling="none")
    assert "importance_sampling='none'" in VLLMRollout(**factory).overlap_off_reason(uncorrected)
    assert VLLMRollout(**factory).overlap_off_reason(rollout_grpo(importance_sampling="auto")) is None


def test_a_plan_that_does_not_fit_with_the_engine_beside_the_update_drops_automatic_overlap(monkeypatch, caplog):
    from lightning_rl import MemoryAwarePrecision
    from lightning_rl.plugins.memory_plan import MemoryPlanError

    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(lightning_module=module, precision_plugin=None)
    monkeypatch.setattr("lightning_rl.rollout.vllm_process.process_engine_unsupported_reason", lambda *a: None)
    cb = VLLMRollout(prompts_per_step=2)  # automatic overlap, which this policy could take (patched above)
    cb._trainer = trainer
    assert cb.overlap_off_reason(module) is None
    plugin = MemoryAwarePrecision()
    plugin.device_type = "cuda"
    plugin.register_rollout(cb)
    plans = []

    def make_plan(module_, optimizers, device):
        beside = cb.overlap_off_reason(module) is None
        plans.append(beside)
        if beside:
            raise MemoryPlanError("the train phase does not fit: engine running beside the update 3 GiB")
        return "plan"

    monkeypatch.setattr(plugin, "make_plan", make_plan)
    assert plugin.plan_with_auto_offload(module, [], torch.device("cuda")) == "plan"
    assert plans == [True, False] and not plugin.offload_enabled
    assert "generated between updates instead" in caplog.text
    assert cb.overlap_off_reason(module) == "the memory plan does not fit with the engine beside the update"
    assert not cb.release_overlap()  # once
    forced = VLLMRollout(overlap=True)
    forced._trainer = trainer
    assert not forced.release_overlap()  # overlap=True: the plan's error stands


def test_an_engine_process_that_fails_to_start_falls_back_to_the_in_process_engine(monkeypatch, caplog):
    import lightning_rl.rollout.vllm as vllm_engine
    import lightning_rl.rollout.vllm_process as vllm_process

    built = []

    class NoProcess:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Engine core initialization failed")

    class InProcess:
        def __init__(self, *args, **kwargs):
            built.append(kwargs["settings"])

    monkeypatch.setattr(vllm_process, "process_engine_unsupported_reason", lambda *a: None)
    monkeypatch.setattr(vllm_process, "VLLMProcessEngine", NoProcess)
    monkeypatch.setattr(vllm_engine, "VLLMEngine", InProcess)
    module = rollout_grpo()
    module.configure_model()
    trainer = SimpleNamespace(global_step=0, strategy=None)
    cb = VLLMRollout()
    left = []
    cb._plugin = SimpleNamespace(engine_leaves_the_update=left.append, kv_cache_bytes=None, memory_plan=None,
                                 host_master_weights=None)
    cb._create(trainer, module, 2)
    assert isinstance(cb.engine, InProcess) and not cb.overlapping and len(built) == 1
    assert left == [module]  # the plugin takes back what it shrank for an engine beside the update
    assert "engine process failed to start: RuntimeError: Engine core initialization failed" in caplog.text
    forced = VLLMRollout(overlap=True)  # asked for: the error stands
    with pytest.raises(RuntimeError, match="initialization failed"):
        forced._create(trainer, module, 2)


def test_a_merged_base_is_refused_before_an_engine_starts_for_a_reference_model_several_steps_or_dropout():
    module = rollout_grpo(lora={"r": 4, "lora_alpha": 8}, beta=0.1)
    module.configure_model()
    cb = VLLMRollout(settings=EngineSettings(share_merged_base=True))
    cb.overlap_off_reason = lambda *args: None  # it overlaps, as on a GPU
    cb.build_engine = lambda *args: pytest.fail("the engine must not start")  # nor fall back to an in-process one
    trainer = SimpleNamespace(global_step=0, strategy=None)
    with pytest.raises(ValueError, match=r"share_merged_base=True is impossible here: .*reference model \(beta > 0\)"):
        cb._create(trainer, module, 2)
    several = rollout_grpo(lora={"r": 4, "lora_alpha": 8}, num_iterations=2)
    several.configure_model()
    with pytest.raises(ValueError, match=r"takes 2 optimizer steps per rollout"):
        cb._create(trainer, several, 2)
    dropout = rollout_grpo(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1})
    dropout.configure_model()
    with pytest.raises(ValueError, match=r"share_merged_base=True is impossible here: .*LoRA dropout"):
        cb._create(trainer, dropout, 2)


def test_the_default_shares_a_merged_base_only_where_nothing_is_against_it():
    """``share_merged_base=None``: on for plain LoRA with its frozen base in the engine's dtype, one step per
    rollout and no reference model; off, silently, otherwise (what `_create` decides before the engine starts)."""
    built = []

    def started(cb, module):
        cb.overlap_off_reason = lambda *args: None  # it overlaps, as on a GPU
        cb.build_engine = lambda m, n: built.append(cb.sharing_merged_base) or SimpleNamespace()
        cb._create(SimpleNamespace(global_step=0, strategy=None), module, 2)
        return built[-1]

    def lora_module(frozen_dtype=torch.bfloat16, **kw):
        module = rollout_grpo(lora={"r": 4, "lora_alpha": 8, **kw.pop("lora", {})}, **kw)
        module.configure_model()
        for p in module.policy.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)  # MemoryAwarePrecision keeps frozen weights in 16 bits
        return module

    cb = VLLMRollout()
    cb.engine_dtype = lambda policy, trainer=None: torch.bfloat16
    assert started(cb, lora_module()) is True
    assert started(cb, lora_module(frozen_dtype=torch.float32)) is False  # the trainer's base in another dtype
    assert started(cb, lora_module(beta=0.1)) is False
    assert started(cb, lora_module(num_iterations=2)) is False
    assert started(cb, lora_module(lora={"lora_dropout": 0.1})) is False
    full = rollout_grpo()
    full.configure_model()
    assert started(cb, full) is False
    off = VLLMRollout(settings=EngineSettings(share_merged_base=False))
    off.engine_dtype = cb.engine_dtype
    assert started(off, lora_module()) is False


def _full_module_with_masters(**kw):
    """A full-fine-tune GRPO module whose linear weights and embedding got bf16 copies of host masters."""
    from lightning_rl.plugins.host_masters import HostMasterWeights

    module = rollout_grpo(**kw)
    module.configure_model()
    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(module.policy)
    return module, masters


def test_trained_weights_are_shared_when_asked_or_where_nothing_is_against_it_and_refused_before_the_start(
        caplog):
    """``share_trained_weights``: True raises the reason before the engine starts; None (the default) shares a full
    fine-tune with host masters in the engine's dtype and one step per rollout (the engine process then tries, and
    says why not); False and the other cases leave it off."""
    built = []

    def started(cb, module, masters, off_reason=None):
        cb.overlap_off_reason = lambda *args: off_reason  # None: it overlaps, as on a GPU
        cb._plugin = SimpleNamespace(host_master_weights=masters, kv_cache_bytes=None, memory_plan=None)
        cb.engine_dtype = lambda policy, trainer=None: torch.bfloat16
        cb.build_engine = lambda m, n: built.append((cb.sharing_trained_weights, cb._trained_weights_setting())) \
            or SimpleNamespace()
        cb._create(SimpleNamespace(global_step=0, strategy=None), module, 2)
        return built[-1]

    module, masters = _full_module_with_masters()
    assert started(VLLMRollout(), module, masters) == (True, None)  # the default (None) since 2026-12-05
    off = EngineSettings(share_trained_weights=False)
    assert started(VLLMRollout(settings=off), module, masters) == (False, False)
    auto = EngineSettings(share_trained_weights=None)
    assert started(VLLMRollout(settings=auto), module, masters) == (True, None)
    assert started(VLLMRollout(settings=auto), module, None) == (False, False)  # fp32 weights on the device
    several, several_masters = _full_module_with_masters(num_iterations=2)
    assert started(VLLMRollout(settings=auto), several, several_masters) == (False, False)
    fp16 = copy.copy(masters)
    fp16.dtype = torch.float16
    assert started(VLLMRollout(settings=auto), module, fp16) == (False, False)  # not the engine's dtype
    asked = EngineSettings(share_trained_weights=True)
    assert started(VLLMRollout(settings=asked), module, masters) == (True, True)
    for mod, m, why in ((module, None, "master_weights='cpu'"), (several, several_masters, "2 optimizer steps"),
                        (module, fp16, "float16, the engine in torch.bfloat16")):
        cb = VLLMRollout(settings=asked)
        with pytest.raises(ValueError, match=rf"share_trained_weights=True is impossible here: .*{why}"):
            started(cb, mod, m)
    lora = rollout_grpo(lora={"r": 4, "lora_alpha": 8})
    lora.configure_model()
    with pytest.raises(ValueError, match="share_merged_base"):
        started(VLLMRollout(settings=asked), lora, masters)
    with caplog.at_level("WARNING"):  # an in-process engine: the warning says why the engine runs there
        assert started(VLLMRollout(settings=asked), module, None, off_reason="PPO has no importance weights") \
            == (False, False)
    assert "engine runs in this process (PPO has no importance weights)" in caplog.text


def test_the_plan_counts_trained_weights_shared_with_the_engine_once():
    """The engine process's weights that are the trainer's own count as the trainer's, not again beside it."""
    module, masters = _full_module_with_masters()
    plugin = MemoryAwarePrecision(compute_dtype="bfloat16")
    plugin._masters = masters
    trainer = SimpleNamespace(lightning_module=module, precision="bf16-mixed", precision_plugin=plugin,
                              strategy=SimpleNamespace(precision_plugin=plugin), datamodule=None)

    def engine_bytes(share):
        cb = VLLMRollout(prompts_per_step=2, settings=EngineSettings(share_trained_weights=share))
        cb.setup(trainer, module, "fit")
        cb.overlap_off_reason = lambda *args: None
        return cb.rollout_memory(module.training_shape()).engine_weight_bytes

    shared = sum(p.numel() for p in masters.parameters()) * 2
    assert engine_bytes(False) - engine_bytes(None) == shared == engine_bytes(False) - engine_bytes(True) > 0
