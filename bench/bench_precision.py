"""Peak device memory of GRPO steps with MemoryAwarePrecision vs Lightning's ``bf16-mixed``.

Two model shapes, random weights, transformers ``generate`` rollouts (no vLLM): a SmolLM2-135M-shaped
full fine-tune and a Qwen2.5-0.5B-shaped model with LoRA r=16. Writes JSON with the device,
versions, config, and one row per configuration: peak memory, seconds, micro-batch size and the
ratio peak / bf16-mixed peak (target <= 0.60).

Full fine-tune configurations: the plugin as is (optimizer states on the device); with
``optimizer_states="cpu"`` (states in pinned CPU memory, streamed through the step in chunks); and
the latter with ``memory_budget`` = 0.6 x the measured bf16-mixed peak, so the plugin's memory plan
chooses the micro-batch size (recorded in the row).

    python bench/bench_precision.py --out bench/results/precision_<device>.json [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_rl import GRPO, MemoryAwarePrecision, PromptDataModule
from lightning_rl.plugins import MemoryPlanError

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=2048)
CASES: dict[str, dict[str, Any]] = {
    "smollm2-135m-shape full": dict(model="tiny-llama", model_config=SMOLLM2_135M, lora=None),
    "qwen2.5-0.5b-shape lora16": dict(model="tiny-qwen2", model_config=QWEN25_05B, lora={"r": 16, "lora_alpha": 32}),
}
# gradient checkpointing off, as when the results in bench/results/precision_*.json were measured (it is on
# by default on CUDA now): the activations of a micro-batch are what the plan trades against the budget
STEP = dict(num_generations=4, sampling={"max_new_tokens": 32},
            max_prompt_length=32, micro_batch_size=16, chat_template=False,
            learning_rate=1e-5, gradient_checkpointing=False)
BATCH = 4
TARGET = 0.60
PLAN_RESERVE = 64 * 2**20  # the plan's fragmentation reserve in the budgeted row (default 256 MiB)


def reward_len(prompts, completions, **columns):
    """Completion length (any dense reward does for a memory benchmark)."""
    return [float(len(c)) for c in completions]


def _cleanup() -> None:
    """Free what the last fit left and forget its compiled layers, so each fit measures as in its own process."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def measure(case: dict[str, Any], precision: Any, steps: int = 2, callbacks: tuple = (), **grpo: Any) -> dict[str, Any]:
    """Fit ``steps`` GRPO steps on CUDA; peak allocated bytes above what was allocated before.

    Args:
        case: model source and LoRA settings (see ``CASES``).
        precision: a ``Trainer(precision=...)`` string or a precision plugin.
        steps: optimizer steps.
        callbacks: extra Lightning callbacks.
        **grpo: overrides of the GRPO arguments.
    """
    _cleanup()
    L.seed_everything(0, verbose=False)
    args = {**STEP, **case, **grpo}
    module = GRPO(reward_funcs=[reward_len], **args)
    rows = [{"prompt": f"question {i}: what is {i} + {i}?"} for i in range(BATCH * steps)]
    kw = dict(plugins=[precision]) if not isinstance(precision, str) else dict(precision=precision)
    trainer = L.Trainer(max_steps=steps, accelerator="cuda", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=list(callbacks), **kw)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, PromptDataModule(train_data=rows, batch_size=BATCH))
    torch.cuda.synchronize()
    out = {"peak_bytes": torch.cuda.max_memory_allocated() - base, "seconds": time.perf_counter() - t0,
           "steps": trainer.global_step, "micro_batch_size": module.micro_batch_size}
    plan = getattr(precision, "memory_plan", None)
    if plan is not None:
        out["plan"] = {"budget_bytes": plan.budget_bytes, "train_parts": plan.train_parts,
                       "micro_batch_tokens": plan.micro_batch_tokens}
    del trainer, module
    _cleanup()
    return out


def _row(name: str, base: dict[str, Any], run: dict[str, Any], **settings: Any) -> dict[str, Any]:
    ratio = run["peak_bytes"] / base["peak_bytes"]
    print(f"  {name}: peak {run['peak_bytes'] / 2**30:.2f} GiB, {run['seconds']:.1f} s, micro-batch "
          f"{run['micro_batch_size']}, ratio {ratio:.2f}")
    return {"config": name, "settings": settings, **run, "ratio": ratio, f"meets_target_{TARGET:.2f}": ratio <= TARGET}


def run_case(name: str, case: dict[str, Any], steps: int) -> dict[str, Any]:
    """bf16-mixed, then each plugin configuration of the case; one row each."""
    base = measure(case, "bf16-mixed", steps)
    print(f"{name}: bf16-mixed peak {base['peak_bytes'] / 2**30:.2f} GiB, {base['seconds']:.1f} s")
    rows = [_row("MemoryAwarePrecision()", base, measure(case, MemoryAwarePrecision(), steps))]
    if case["lora"] is None:
        rows.append(_row('MemoryAwarePrecision(optimizer_states="cpu")', base,
                         measure(case, MemoryAwarePrecision(optimizer_states="cpu"), steps), optimizer_states="cpu"))
        budget = int(TARGET * base["peak_bytes"])
        label = f'MemoryAwarePrecision(optimizer_states="cpu", memory_budget={TARGET} x bf16-mixed peak)'
        settings = dict(optimizer_states="cpu", memory_budget=budget, reserved_bytes=PLAN_RESERVE)
        try:
            run = measure(case, MemoryAwarePrecision(**settings), steps)
        except MemoryPlanError as err:  # the plan found no micro-batch that fits: say so instead of a number
            print(f"  {label}: no plan fits\n{err}")
            rows.append({"config": label, "settings": settings, "error": str(err)})
        else:
            rows.append(_row(label, base, run, **settings))
    best = min((r for r in rows if "ratio" in r), key=lambda r: r["ratio"])
    return {"bf16-mixed": base, "configurations": rows,
            "summary": [f"{r['config']}: " + (f"ratio {r['ratio']:.3f} at micro_batch_size {r['micro_batch_size']}"
                                             if "ratio" in r else "no plan fits") for r in rows],
            "best_ratio": best["ratio"], f"meets_target_{TARGET:.2f}": best["ratio"] <= TARGET}


def main(argv: list[str] | None = None) -> int:
    """Run every case with bf16-mixed and the plugin configurations, and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_precision: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    device = torch.cuda.get_device_name()
    results = {name: run_case(name, case, args.steps) for name, case in CASES.items()}
    report = {
        "benchmark": "peak device memory of GRPO steps, MemoryAwarePrecision vs bf16-mixed",
        "device": device,
        "versions": {"torch": torch.__version__, "lightning": L.__version__,
                     "transformers": importlib.metadata.version("transformers"), "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "config": {"cases": CASES, "grpo": STEP, "prompts_per_step": BATCH, "steps": args.steps,
                   "rollout": "transformers generate", "peak": "torch.cuda.max_memory_allocated above the start",
                   "ratio": "configuration peak / bf16-mixed peak of the same case", "target": TARGET},
        "results": results,
    }
    out = args.out or Path("bench/results") / f"precision_{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
