"""Long runs on one GPU (SmolLM2-135M-Instruct): device memory over many engine cycles and GRPO steps, and a
failure mid-run that leaves a checkpoint a fresh process resumes from.

    python bench/bench_long_run.py --out bench/results/long_run.json       # every part, each in its own process
    python bench/bench_long_run.py --part engine-full --out /tmp/x.json    # one part

Parts (vLLM's sleep-mode allocator serves one engine per process, so each runs in its own):
  engine-full, engine-lora  --cycles (500) wake / sync / generate / sleep cycles of the VLLMEngine, the policy
                            changed a little before every sync (full weights; a LoRA adapter)
  grpo                      --steps (200) GRPO steps with VLLMRollout and MemoryAwarePrecision
  fail-reward, fail-engine  a reward function (or the engine's generate) raises at step 6; last.ckpt holds step 5;
                            a fresh process resumes from it with VLLMRollout and trains 3 more steps
After every cycle or step the part records this process's device memory from NVML (it sees vLLM's own allocator
and the CUDA context, and only this process, so parts can run at once on one GPU), the device's `total - free`,
and torch's counters. The growth is the median of the last 20 samples minus the median of the 20 after a
10-sample warm-up (target < 64 MiB), on the process's NVML figure.

    bash bench/gpu_run.sh long-parallel   # every part at once, each in its own process (about 5 minutes)
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_rl
from lightning_rl import GRPO, ArithmeticDataModule, MemoryAwarePrecision, VLLMRollout
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.prompting import encode_prompts
from lightning_rl.rewards import NumericMatch
from lightning_rl.rollout import SamplingConfig

MIB = 2**20
GROWTH_LIMIT_MIB = 64
PARTS = ("engine-full", "engine-lora", "grpo", "fail-reward", "fail-engine")
FAIL_AT, RESUME_STEPS = 6, 3


@functools.cache
def nvml_device() -> Any:
    """NVML's handle of this process's CUDA device (NVML initialised once)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())


def process_used_mib() -> float:
    """This process's device memory as NVML reports it (NaN when NVML does not list the process)."""
    import pynvml

    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(nvml_device()):
        if p.pid == os.getpid() and p.usedGpuMemory:
            return p.usedGpuMemory / MIB
    return float("nan")


def memory() -> dict[str, float]:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"process_used_mib": process_used_mib(), "device_used_mib": (total - free) / MIB,
            "torch_allocated_mib": torch.cuda.memory_allocated() / MIB,
            "torch_reserved_mib": torch.cuda.memory_reserved() / MIB}


def growth(samples: list[dict[str, float]], key: str = "process_used_mib", warm: int = 10, window: int = 20) -> dict:
    values = [s[key] for s in samples]
    if len(values) < warm + 2 * window:
        return {"key": key, "note": f"too few samples ({len(values)})"}
    early, late = statistics.median(values[warm:warm + window]), statistics.median(values[-window:])
    return {"key": key, "early_mib": early, "late_mib": late, "growth_mib": late - early,
            "max_minus_min_after_warmup_mib": max(values[warm:]) - min(values[warm:]),
            "limit_mib": GROWTH_LIMIT_MIB, "ok": late - early < GROWTH_LIMIT_MIB}


def header(args) -> dict:
    import vllm

    return {"device": torch.cuda.get_device_name(0), "part": args.part,
            "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
                         "lightning": L.__version__, "lightning_rl": lightning_rl.__version__}}


def eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id}
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return sorted(i for i in ids if i is not None)


# ------------------------------------------------------------------------------------------ engine cycles
def engine_cycles(args, lora: bool) -> dict:
    from lightning_rl.rollout import EngineSettings
    from lightning_rl.rollout.vllm import VLLMEngine

    torch.manual_seed(0)
    model, tok = load_policy("smollm2-135m-instruct", dtype="bfloat16")
    model = model.cuda()
    if lora:
        model = apply_lora(model, {"r": 16, "lora_alpha": 32})
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    changing = [p for n, p in model.named_parameters() if ("lora_B" in n) == lora][:8]
    data = ArithmeticDataModule(num_train=args.prompts, num_val=1, batch_size=args.prompts, max_operand=99)
    ids = encode_prompts(tok, [r["prompt"] for r in data.train_split])
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    engine = VLLMEngine(model, eos_ids(model, tok), tok.pad_token_id, max_model_len=128 + args.max_new_tokens,
                        max_num_seqs=args.prompts * args.G,
                        settings=EngineSettings(kv_cache_bytes=512 * MIB, dtype="bfloat16",
                                                lora_sync="adapter" if lora else "auto"))
    samples, t0 = [], time.perf_counter()
    try:
        for cycle in range(args.cycles):
            with torch.no_grad():
                for p in changing:  # stands in for an optimizer step: the next sync has new weights to push
                    p.add_(torch.randn_like(p), alpha=1e-4)
            engine.wake_up()
            engine.sync_weights(model)
            rollout = engine.generate(ids, sampling, args.G)
            awake = memory()["process_used_mib"]
            engine.sleep()
            tokens = int(rollout.completion_mask.sum())
            samples.append({"cycle": cycle, "awake_process_used_mib": awake, "tokens": tokens, **memory()})
            if cycle % 50 == 0:
                print(f"{'lora' if lora else 'full'} cycle {cycle}: {samples[-1]}", flush=True)
    finally:
        engine.shutdown()
    return {"config": {"model": "SmolLM2-135M-Instruct (bf16)", "lora": {"r": 16} if lora else None,
                       "cycles": args.cycles, "prompts": args.prompts, "G": args.G,
                       "max_new_tokens": args.max_new_tokens, "sleep_level": engine.sleep_level,
                       "lora_mode": engine.lora_mode},
            "seconds": time.perf_counter() - t0, "growth_asleep": growth(samples),
            "growth_awake": growth(samples, "awake_process_used_mib"),
            "growth_device_used": growth(samples, "device_used_mib"), "samples": samples}


# ------------------------------------------------------------------------------------------ GRPO runs
class MemoryPerStep(L.Callback):
    def __init__(self):
        self.samples = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples.append({"step": trainer.global_step, **memory(),
                             "reward": float(trainer.callback_metrics.get("train/reward_step", float("nan")))})
        if trainer.global_step % 25 == 0:
            print(f"grpo step {trainer.global_step}: {self.samples[-1]}", flush=True)


class FlakyReward:
    """NumericMatch that raises at its ``fail_at``-th call (never when ``fail_at`` is 0)."""

    __name__ = "flaky_numeric_match"

    def __init__(self, fail_at: int = 0):
        self.fail_at, self.calls, self.inner = fail_at, 0, NumericMatch()

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"reward service down at call {self.calls}")
        return self.inner(prompts, completions, **columns)


class FailingGenerate(L.Callback):
    """Makes the rollout engine's generate raise at the ``fail_at``-th rollout."""

    def __init__(self, rollout_cb: VLLMRollout, fail_at: int):
        self.rollout_cb, self.fail_at, self.rollouts = rollout_cb, fail_at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rollouts += 1
        if self.rollouts == self.fail_at:
            def broken(*args, **kwargs):
                raise RuntimeError(f"engine failure at rollout {self.fail_at}")
            self.rollout_cb.engine.generate = broken


def grpo_run(args, steps: int, reward=None, callbacks=(), ckpt_dir=None, ckpt_path=None):
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[reward or NumericMatch()], model="smollm2-135m-instruct", num_generations=args.G,
                  sampling={"max_new_tokens": args.max_new_tokens},
                  micro_batch_size=32, max_prompt_length=128, learning_rate=1e-5,
                  importance_sampling="token")
    rollout = VLLMRollout()
    recorder = MemoryPerStep()
    extra = [c(rollout) if callable(c) and not isinstance(c, L.Callback) else c for c in callbacks]
    if ckpt_dir is not None:
        extra.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True))
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=ckpt_dir is not None, limit_val_batches=0,
                        callbacks=[recorder, *extra, rollout], plugins=[MemoryAwarePrecision()])
    data = ArithmeticDataModule(num_train=400, num_val=4, batch_size=args.prompts, max_operand=99)
    error = None
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Exception as err:  # the failure parts expect one
        error = f"{type(err).__name__}: {err}"
    return trainer, rollout, recorder, error, time.perf_counter() - t0


def grpo_long(args) -> dict:
    trainer, rollout, recorder, error, seconds = grpo_run(args, args.steps)
    return {"config": {"model": "SmolLM2-135M-Instruct", "plugin": "MemoryAwarePrecision", "steps": args.steps,
                       "prompts": args.prompts, "G": args.G, "max_new_tokens": args.max_new_tokens},
            "error": error, "global_step": trainer.global_step, "num_syncs": rollout.num_syncs, "seconds": seconds,
            "growth": growth(recorder.samples), "growth_device_used": growth(recorder.samples, "device_used_mib"),
            "growth_torch_allocated": growth(recorder.samples, "torch_allocated_mib"), "samples": recorder.samples}


def fail_and_resume(args, what: str) -> dict:
    """Phase 1 here (fails at step FAIL_AT); phase 2 in a fresh process resumes from last.ckpt."""
    ckpt_dir = args.ckpt_dir or tempfile.mkdtemp(prefix="lightning-rl-long-")
    if args.resume:
        trainer, rollout, recorder, error, seconds = grpo_run(args, args.resume, ckpt_dir=ckpt_dir + "/resumed",
                                                              ckpt_path=ckpt_dir + "/last.ckpt")
        return {"error": error, "global_step": trainer.global_step, "num_rollouts": rollout.num_rollouts,
                "seconds": seconds, "samples": recorder.samples}
    reward = FlakyReward(FAIL_AT if what == "reward" else 0)
    callbacks = [lambda cb: FailingGenerate(cb, FAIL_AT)] if what == "engine" else []
    trainer, rollout, recorder, error, seconds = grpo_run(args, FAIL_AT + 4, reward=reward, callbacks=callbacks,
                                                          ckpt_dir=ckpt_dir)
    # the broken generate() serves the first rollout generated after batch FAIL_AT starts: that batch's own, or,
    # when rollouts overlap the updates, the next batch's (batch FAIL_AT's was generated during the last update)
    last_good = FAIL_AT - 1 + int(what == "engine" and rollout.overlapping)
    saved_step = torch.load(ckpt_dir + "/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    out_path = ckpt_dir + "/resume.json"
    cmd = [sys.executable, __file__, "--part", args.part, "--out", out_path, "--ckpt-dir", ckpt_dir,
           "--resume", str(saved_step + RESUME_STEPS), "--prompts", str(args.prompts), "--G", str(args.G),
           "--max-new-tokens", str(args.max_new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    resumed = json.load(open(out_path)) if os.path.exists(out_path) else {"stderr": proc.stderr[-3000:]}
    ok = (error is not None and saved_step == last_good and resumed.get("error") is None
          and resumed.get("global_step") == saved_step + RESUME_STEPS)
    return {"config": {"fails": what, "at_step": FAIL_AT, "resume_steps": RESUME_STEPS},
            "phase1": {"error": error, "global_step": trainer.global_step, "checkpoint_step": saved_step,
                       "expected_checkpoint_step": last_good, "overlapped": rollout.overlapping,
                       "seconds": seconds, "samples": recorder.samples},
            "resumed": resumed, "ok": ok}


# ------------------------------------------------------------------------------------------ main
def run_part(args) -> dict:
    if args.part.startswith("engine-"):
        return engine_cycles(args, lora=args.part == "engine-lora")
    if args.part == "grpo":
        return grpo_long(args)
    return fail_and_resume(args, args.part.removeprefix("fail-"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", default="all", choices=("all", *PARTS))
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    ap.add_argument("--resume", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.part != "all":
        result = run_part(args) if args.resume else {**header(args), **run_part(args)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        summary = {k: v for k, v in result.items() if k not in ("samples", "phase1", "resumed")}
        print(args.part, json.dumps(summary), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for part in PARTS:
            out = f"{d}/{part}.json"
            cmd = [sys.executable, __file__, "--part", part, "--out", out, "--cycles", str(args.cycles),
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--G", str(args.G),
                   "--max-new-tokens", str(args.max_new_tokens)]
            print("running", " ".join(cmd[1:]), flush=True)
            proc = subprocess.run(cmd, text=True, timeout=1800)
            results[part] = json.load(open(out)) if os.path.exists(out) else {"returncode": proc.returncode}
    keys = ("growth_asleep", "growth", "ok", "error")
    summary = {p: {k: r.get(k) for k in keys if k in r} for p, r in results.items()}
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "parts": results}, f, indent=1)


if __name__ == "__main__":
    main()
