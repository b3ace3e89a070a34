"""Rollout throughput and toggle overhead of the colocated vLLM engine (VLLMRollout) on SmolLM2-135M-Instruct.

Compares, on the same prompts and G:
  * tokens/s of rollouts generated through the callback during a GRPO fit,
  * transformers ``generate`` (HFEngine, all sequences in one batch),
  * a standalone ``vllm.LLM`` loading the same weights from disk, run the way a user runs vLLM: its own
    process, vLLM's default multiprocessing engine core, no sleep mode, the same execution mode,
and the toggle overhead per step (wake + sync + sleep) against the whole GRPO step.

    python bench/bench_rollout.py --out bench/results/rollout.json [--execution cuda_graphs|compiled|eager]
    python bench/bench_rollout.py --model qwen05 --prompts 32 --G 8 --max-new-tokens 256 --steps 3 --out X.json

``--model qwen05`` is a Qwen2.5-0.5B-shaped model with random weights (bench_vs_trl.py's folder; speed only):
decoding 256 sequences of it is bound by the GPU rather than by Python, where the throughput targets apply.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import transformers

import lightning_rl
from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout
from lightning_rl.rewards import NumericMatch
from lightning_rl.rollout import EngineSettings, HFEngine


class StepTimer(L.Callback):
    """Wall time of each training batch (rollout + train) and the rollout the VLLMRollout callback attached."""

    def __init__(self, rollout_cb):
        self.rollout_cb = rollout_cb
        self.steps = []
        self.sleep_level = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        tokens = int(batch["rollout"].completion_mask.sum())
        self.sleep_level = getattr(self.rollout_cb.engine, "sleep_level", None)
        self.steps.append({"step_s": time.perf_counter() - self.t0, "tokens": tokens,
                           "device_used_gib": device_used_gib(), **self.rollout_cb.last_timings})


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def device_used_gib():
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def standalone(model_dir, ids_path, G, max_new_tokens, execution, eos):
    """Run in a child process: vLLM as a user runs it, on the saved weights; prints one JSON line."""
    import vllm

    from lightning_rl.rollout.vllm_sizing import execution_kwargs

    ids = json.load(open(ids_path))
    t0 = time.perf_counter()
    llm = vllm.LLM(model=model_dir, dtype="bfloat16", gpu_memory_utilization=0.3, seed=0,
                   max_model_len=128 + max_new_tokens, **execution_kwargs(execution))
    start = time.perf_counter() - t0
    params = vllm.SamplingParams(n=G, temperature=1.0, max_tokens=max_new_tokens, logprobs=0, flat_logprobs=True,
                                 stop_token_ids=eos, detokenize=False)
    rates, tokens = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(c.token_ids) for o in outs for c in o.outputs)
        rates.append(n / dt)
        tokens.append(n)
    print("STANDALONE " + json.dumps({"startup_s": start, "tokens_per_s": median(rates[1:]), "runs": rates,
                                      "tokens": tokens,
                                      "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen05"])
    ap.add_argument("--models", default="/tmp/bench_models", help="where bench_vs_trl.py's model folders go")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--execution", default="cuda_graphs", choices=["cuda_graphs", "compiled", "eager"])
    ap.add_argument("--sleep-level", type=int, default=None, choices=[0, 1, 2], help="engine sleep level")
    ap.add_argument("--skip-standalone", action="store_true")
    ap.add_argument("--standalone", nargs=2, metavar=("MODEL_DIR", "IDS_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--eos", type=int, nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.standalone:
        return standalone(*args.standalone, args.G, args.max_new_tokens, args.execution, args.eos)
    import vllm
    torch.manual_seed(0)
    data = ArithmeticDataModule(num_train=args.prompts * (args.steps + 1), num_val=4, batch_size=args.prompts,
                                max_operand=99, shuffle=False)
    data.setup("fit")
    source = "smollm2-135m-instruct"
    if args.model != "smollm2":
        from bench_vs_trl import prepare_models

        source = prepare_models(Path(args.models), {args.model})[args.model]
    module = GRPO(reward_funcs=[NumericMatch()], model=source, dtype="bfloat16",
                  num_generations=args.G, sampling={"max_new_tokens": args.max_new_tokens}, micro_batch_size=32,
                  importance_sampling="token", max_prompt_length=128, learning_rate=1e-6,
                  generation_batch_size=args.prompts * args.G)
    module.configure_model()
    prompts = [r["prompt"] for r in data.train_rows[: args.prompts]]
    ids = module.encode(prompts)
    result = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
                     "lightning": L.__version__, "lightning_rl": lightning_rl.__version__},
        "config": {"model": {"smollm2": "SmolLM2-135M-Instruct (bf16)",
                             "qwen05": "Qwen2.5-0.5B shape, random weights (bf16)"}[args.model],
                   "prompts": args.prompts, "G": args.G,
                   "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "steps": args.steps,
                   "execution": args.execution, "sleep_level": args.sleep_level, "full fine-tune": True,
                   "mean_prompt_tokens": sum(map(len, ids)) / len(ids)},
    }

    # ---------------------------------------------------------------- standalone vLLM (same weights, from disk)
    if not args.skip_standalone:
        with tempfile.TemporaryDirectory() as d:
            cfg = module.policy.config
            if hasattr(cfg, "quantization_config"):  # de-quantized GGUF: save it as a plain model
                cfg = type(module.policy.config).from_dict({k: v for k, v in module.policy.config.to_dict().items()
                                                            if k != "quantization_config"})
            plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            plain.load_state_dict(module.policy.state_dict())
            plain.save_pretrained(d)
            del plain
            module.tokenizer.save_pretrained(d)
            json.dump(ids, open(f"{d}/ids.json", "w"))
            env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
            cmd = [sys.executable, __file__, "--out", "-", "--standalone", d, f"{d}/ids.json", "--G", str(args.G),
                   "--max-new-tokens", str(args.max_new_tokens), "--execution", args.execution,
                   "--eos", *map(str, module.eos_token_ids)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
            line = [x for x in proc.stdout.splitlines() if x.startswith("STANDALONE ")]
            if line:
                result["standalone_vllm"] = json.loads(line[-1].removeprefix("STANDALONE "))
                print("standalone vLLM", result["standalone_vllm"], flush=True)
            else:
                print("standalone vLLM failed:", proc.stderr[-3000:], flush=True)

    # ---------------------------------------------------------------- transformers generate
    module.policy.cuda()
    from lightning_rl.rollout import SamplingConfig

    hf = HFEngine(module.policy, module.tokenizer.pad_token_id, module.eos_token_ids,
                  max_batch_size=args.prompts * args.G)
    sampling = SamplingConfig(args.max_new_tokens, 1.0)
    rates = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = hf.generate(ids, sampling, args.G)
        torch.cuda.synchronize()
        rates.append(float(r.completion_mask.sum()) / (time.perf_counter() - t0))
    result["transformers_generate"] = {"tokens_per_s": max(rates), "runs": rates, "batch": args.prompts * args.G}
    print("transformers", result["transformers_generate"], flush=True)
    module.policy.cpu()
    torch.cuda.empty_cache()

    # ---------------------------------------------------------------- GRPO fit through the callback
    rollout_cb = VLLMRollout(settings=EngineSettings(execution=args.execution, sleep_level=args.sleep_level))
    timer = StepTimer(rollout_cb)
    torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, rollout_cb],
                        limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - t0
    steady = timer.steps[1:]  # the first step includes warm-up
    step_s = median([s["step_s"] for s in steady])
    toggle_s = median([s["toggle_s"] for s in steady])
    cb_rate = median([s["tokens"] / s["generate_s"] for s in steady])
    result["callback"] = {
        "fit_s_including_engine_start": fit_s,
        "sleep_level": timer.sleep_level,
        "tokens_per_s": cb_rate,
        "step_s": step_s,
        "toggle_s": toggle_s,
        "wake_s": median([s["wake_s"] for s in steady]),
        "sync_s": median([s["sync_s"] for s in steady]),
        "sleep_s": median([s["sleep_s"] for s in steady]),
        "generate_s": median([s["generate_s"] for s in steady]),
        "toggle_fraction_of_step": toggle_s / step_s,
        "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_device_used_gib_sampled": max(s["device_used_gib"] for s in timer.steps),
        "logprob_mismatch_mean_last": float(trainer.callback_metrics.get("train/logprob_mismatch_mean", float("nan"))),
        "steps": timer.steps,
    }
    result["ratios"] = {"callback_vs_transformers": cb_rate / result["transformers_generate"]["tokens_per_s"]}
    if "standalone_vllm" in result:
        result["ratios"]["callback_vs_standalone_vllm"] = cb_rate / result["standalone_vllm"]["tokens_per_s"]
    result["targets"] = {"callback_vs_transformers": ">= 10", "callback_vs_standalone_vllm": ">= 0.9",
                         "toggle_fraction_of_step": "< 0.05"}
    print(json.dumps({k: v for k, v in result.items() if k != "callback"}, indent=1))
    print("callback", {k: v for k, v in result["callback"].items() if k != "steps"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
