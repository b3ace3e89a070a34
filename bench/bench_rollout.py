"""Rollout throughput and toggle overhead of the colocated vLLM engine (VLLMRollout) on SmolLM2-135M-Instruct.

Compares, on the same prompts and G:
  * tokens/s of rollouts generated through the callback during a GRPO fit,
  * transformers ``generate`` (HFEngine, all sequences in one batch),
  * a standalone ``vllm.LLM`` loading the same weights from disk (no sleep mode),
and the toggle overhead per step (wake + sync + sleep) against the whole GRPO step.

    python bench/bench_rollout.py --out bench/results/rollout.json [--compile]
"""

import argparse
import json
import statistics
import tempfile
import time

import lightning as L
import torch
import transformers

import lightning_rl
from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout
from lightning_rl.rewards import NumericMatch
from lightning_rl.rollout import HFEngine


class StepTimer(L.Callback):
    """Wall time of each training batch (rollout + train) and the rollout the VLLMRollout callback attached."""

    def __init__(self, rollout_cb):
        self.rollout_cb = rollout_cb
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        tokens = int(batch["rollout"].completion_mask.sum())
        self.steps.append({"step_s": time.perf_counter() - self.t0, "tokens": tokens, **self.rollout_cb.last_timings})


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="torch.compile + CUDA graphs in vLLM (slow start)")
    ap.add_argument("--skip-standalone", action="store_true")
    args = ap.parse_args()
    import vllm

    eager = not args.compile
    torch.manual_seed(0)
    data = ArithmeticDataModule(num_train=args.prompts * (args.steps + 1), num_val=4, batch_size=args.prompts,
                                shuffle=False)
    data.setup("fit")
    module = GRPO(reward_funcs=[NumericMatch()], model="smollm2-135m-instruct", dtype="bfloat16",
                  num_generations=args.G, max_new_tokens=args.max_new_tokens, micro_batch_size=32,
                  max_prompt_length=128, learning_rate=1e-6, generation_batch_size=args.prompts * args.G)
    module.configure_model()
    prompts = [r["prompt"] for r in data.train_rows[: args.prompts]]
    ids = module.encode(prompts)
    result = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
                     "lightning": L.__version__, "lightning_rl": lightning_rl.__version__},
        "config": {"model": "SmolLM2-135M-Instruct (bf16)", "prompts": args.prompts, "G": args.G,
                   "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "steps": args.steps,
                   "enforce_eager": eager, "mean_prompt_tokens": sum(map(len, ids)) / len(ids)},
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
            t0 = time.perf_counter()
            llm = vllm.LLM(model=d, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=eager, seed=0,
                           max_model_len=128 + args.max_new_tokens)
            start = time.perf_counter() - t0
            params = vllm.SamplingParams(n=args.G, temperature=1.0, max_tokens=args.max_new_tokens, logprobs=0,
                                         stop_token_ids=module.eos_token_ids, detokenize=False)
            rates = []
            for _ in range(4):
                t0 = time.perf_counter()
                outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
                dt = time.perf_counter() - t0
                rates.append(sum(len(c.token_ids) for o in outs for c in o.outputs) / dt)
            result["standalone_vllm"] = {"startup_s": start, "tokens_per_s": median(rates[1:]), "runs": rates}
            llm.llm_engine.engine_core.shutdown()
            del llm, outs
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        print("standalone vLLM", result["standalone_vllm"], flush=True)

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
    rollout_cb = VLLMRollout(enforce_eager=eager)
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
        "tokens_per_s": cb_rate,
        "step_s": step_s,
        "toggle_s": toggle_s,
        "wake_s": median([s["wake_s"] for s in steady]),
        "sync_s": median([s["sync_s"] for s in steady]),
        "sleep_s": median([s["sleep_s"] for s in steady]),
        "generate_s": median([s["generate_s"] for s in steady]),
        "toggle_fraction_of_step": toggle_s / step_s,
        "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
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
