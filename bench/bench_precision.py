"""Peak device memory of GRPO steps with MemoryAwarePrecision vs Lightning's ``bf16-mixed``.

Two model shapes, random weights, transformers ``generate`` rollouts (no vLLM): a SmolLM2-135M-shaped
full fine-tune and a Qwen2.5-0.5B-shaped model with LoRA r=16. Writes JSON with the device,
versions, config, peak memory per run and the ratio plugin / bf16-mixed (target <= 0.60).

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

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=2048)
CASES: dict[str, dict[str, Any]] = {
    "smollm2-135m-shape full": dict(model="tiny-llama", model_config=SMOLLM2_135M, lora=None),
    "qwen2.5-0.5b-shape lora16": dict(model="tiny-qwen2", model_config=QWEN25_05B, lora={"r": 16, "lora_alpha": 32}),
}
STEP = dict(num_generations=4, max_new_tokens=32, max_prompt_length=32, micro_batch_size=16, chat_template=False,
            learning_rate=1e-5)
BATCH = 4


def reward_len(prompts, completions, **columns):
    """Completion length (any dense reward does for a memory benchmark)."""
    return [float(len(c)) for c in completions]


def _cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure(case: dict[str, Any], precision: Any, steps: int = 2, **grpo: Any) -> dict[str, Any]:
    """Fit ``steps`` GRPO steps on CUDA; peak allocated bytes above what was allocated before.

    Args:
        case: model source and LoRA settings (see ``CASES``).
        precision: a ``Trainer(precision=...)`` string or a precision plugin.
        steps: optimizer steps.
        **grpo: overrides of the GRPO arguments.
    """
    _cleanup()
    L.seed_everything(0, verbose=False)
    args = {**STEP, **case, **grpo}
    module = GRPO(reward_funcs=[reward_len], **args)
    rows = [{"prompt": f"question {i}: what is {i} + {i}?"} for i in range(BATCH * steps)]
    kw = dict(plugins=[precision]) if not isinstance(precision, str) else dict(precision=precision)
    trainer = L.Trainer(max_steps=steps, accelerator="cuda", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, PromptDataModule(train_data=rows, batch_size=BATCH))
    torch.cuda.synchronize()
    out = {"peak_bytes": torch.cuda.max_memory_allocated() - base, "seconds": time.perf_counter() - t0,
           "steps": trainer.global_step, "micro_batch_size": module.micro_batch_size}
    del trainer, module
    _cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every case with both precisions and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_precision: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    device = torch.cuda.get_device_name()
    results = {}
    for name, case in CASES.items():
        base = measure(case, "bf16-mixed", args.steps)
        plugin = measure(case, MemoryAwarePrecision(), args.steps)
        ratio = plugin["peak_bytes"] / base["peak_bytes"]
        results[name] = {"bf16-mixed": base, "MemoryAwarePrecision": plugin, "ratio": ratio,
                         "meets_target_0.60": ratio <= 0.60}
        print(f"{name}: bf16-mixed {base['peak_bytes'] / 2**30:.2f} GiB, plugin {plugin['peak_bytes'] / 2**30:.2f} "
              f"GiB, ratio {ratio:.2f}")
    report = {
        "benchmark": "peak device memory of GRPO steps, MemoryAwarePrecision vs bf16-mixed",
        "device": device,
        "versions": {"torch": torch.__version__, "lightning": L.__version__,
                     "transformers": importlib.metadata.version("transformers"), "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "config": {"cases": CASES, "grpo": STEP, "prompts_per_step": BATCH, "steps": args.steps,
                   "rollout": "transformers generate", "peak": "torch.cuda.max_memory_allocated above the start"},
        "results": results,
    }
    out = args.out or Path("bench/results") / f"precision_{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
