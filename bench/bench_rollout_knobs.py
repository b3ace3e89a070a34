"""Where the colocated engine's rollout time goes, and how far its log-probs are from the trainer's.

Each engine setting runs in its own process (vLLM's sleep-mode allocator allows one engine per
process). Per setting, on SmolLM2-135M-Instruct, 16 prompts x G=8, up to 128 new tokens at
temperature 1 (the rollout benchmark's shape):

* tokens/s of ``VLLMEngine.generate`` (median of 4 runs after a warm-up), the number of decode steps
  (the longest completion) and the wall time per decode step;
* with ``--profile``: the GPU kernel time of one generate call (torch profiler), against its wall time;
* with ``--mismatch``: mean / median / p90 / max ``|engine log p - trainer log p|`` over sampled completion
  tokens, for trainers in fp32, fp32 master weights under bf16 autocast and pure bf16, and, without the
  engine, pure bf16 and autocast against fp32 on the same tokens (the bf16 noise floor of the model).

    python bench/bench_rollout_knobs.py --out bench/results/rollout_knobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS: dict[str, dict] = {
    "default": {"mismatch": True, "profile": True},
    "bf16_logits": {"engine": {"fp32_logits": False}, "mismatch": True},
    "no_async_scheduling": {"engine": {"engine_kwargs": {"async_scheduling": False}}},
    "no_prefix_caching": {"engine": {"enable_prefix_caching": False}},
    "fp32_engine": {"engine": {"dtype": "float32"}, "mismatch": True},
    "bf16_logits_no_prefix_caching": {"engine": {"fp32_logits": False, "enable_prefix_caching": False}},
    # the callback's cycle around every generate: sleep, wake, push the weights
    "toggle_level2": {"engine": {"sleep_level": 2}, "toggle": True},
    "toggle_level0": {"engine": {"sleep_level": 0}, "toggle": True},
    # 3 million live Python objects created after the engine started (vLLM froze the heap before them),
    # as a training process has more of than this probe: does the garbage collector slow generate down?
    "big_heap": {"heap": 3_000_000},
}


def child(name: str, prompts: int, G: int, max_new_tokens: int) -> dict:
    """Run one setting in this process and return its measurements."""
    import copy

    import torch

    from lightning_rl.data import ArithmeticDataModule
    from lightning_rl.logprobs import completion_logprobs
    from lightning_rl.models import load_policy
    from lightning_rl.prompting import encode_prompts
    from lightning_rl.rollout import EngineSettings, SamplingConfig
    from lightning_rl.rollout.vllm import VLLMEngine

    setting = SETTINGS[name]
    model, tok = load_policy("smollm2-135m-instruct", dtype="float32")
    model = model.cuda().eval()
    eos = sorted(
        {
            tok.eos_token_id,
            *(
                [model.generation_config.eos_token_id]
                if isinstance(model.generation_config.eos_token_id, int)
                else (model.generation_config.eos_token_id or [])
            ),
        }
    )
    data = ArithmeticDataModule(num_train=prompts, num_val=4, batch_size=prompts, max_operand=99, shuffle=False)
    data.setup("fit")
    ids = encode_prompts(tok, [r["prompt"] for r in data.train_rows[:prompts]])
    sizes = {"max_model_len": 128 + max_new_tokens, "max_num_seqs": prompts * G}
    kwargs = {
        "dtype": "bfloat16",
        "kv_cache_bytes": 1 << 30,
        **setting.get("engine", {}),
    }
    engine = VLLMEngine(model, eos, tok.pad_token_id, **sizes, settings=EngineSettings(**kwargs))
    out: dict = {
        "setting": name,
        "engine_kwargs": {**sizes, **kwargs},
        "startup_s": engine.startup_time,
        "async_scheduling": engine.llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
    }
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    heap = [{"i": i} for i in range(setting.get("heap", 0))]
    out["live_objects_added"] = len(heap)
    engine.generate(ids, sampling, G)  # warm-up
    runs = []
    for _ in range(4):
        toggle_s = None
        if setting.get("toggle"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.sleep()
            engine.wake_up()
            engine.sync_weights(model)
            torch.cuda.synchronize()
            toggle_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = engine.generate(ids, sampling, G, seed=None)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        lengths = r.completion_mask.sum(1)
        runs.append({"s": dt, "tokens": int(lengths.sum()), "decode_steps": int(lengths.max()), "toggle_s": toggle_s})
    out["runs"] = runs
    out["tokens_per_s"] = statistics.median(x["tokens"] / x["s"] for x in runs)
    out["ms_per_decode_step"] = statistics.median(1e3 * x["s"] / x["decode_steps"] for x in runs)
    if setting.get("toggle"):
        out["toggle_s"] = statistics.median(x["toggle_s"] for x in runs)
    del heap

    if setting.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = engine.generate(ids, sampling, G)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        out["profile"] = {
            "wall_s": wall,
            "gpu_kernel_s": gpu_us / 1e6,
            "decode_steps": int(r.completion_mask.sum(1).max()),
            "top_gpu": [{"name": e.key[:80], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
            "top_cpu": [
                {"name": e.key[:80], "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
            ],
        }

    if setting.get("mismatch"):

        def stats(delta):
            d = delta.abs().float()
            return {
                "mean": d.mean().item(),
                "median": d.median().item(),
                "p90": d.quantile(0.9).item(),
                "max": d.max().item(),
                "tokens": d.numel(),
            }

        def trainer_logprobs(net, roll, autocast):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                lp, _ = completion_logprobs(
                    net,
                    roll.prompt_ids,
                    roll.prompt_mask,
                    roll.completion_ids,
                    roll.completion_mask,
                    temperature=1.0,
                    backend="reference",
                )
            return lp

        roll = engine.generate(ids, SamplingConfig(max_new_tokens=64, temperature=1.0), 4, seed=3).to("cuda")
        m = roll.completion_mask.bool()
        fp32 = trainer_logprobs(model, roll, False)
        mixed = trainer_logprobs(model, roll, True)
        bf16 = trainer_logprobs(copy.deepcopy(model).to(torch.bfloat16), roll, False)
        eng = roll.sampling_logprobs
        out["mismatch_sampled"] = {
            "engine_vs_trainer_fp32": stats((eng - fp32)[m]),
            "engine_vs_trainer_autocast": stats((eng - mixed)[m]),
            "engine_vs_trainer_bf16": stats((eng - bf16)[m]),
            "trainer_bf16_vs_fp32": stats((bf16 - fp32)[m]),
            "trainer_autocast_vs_fp32": stats((mixed - fp32)[m]),
            "mean_neg_logp_fp32": (-fp32[m]).mean().item(),
        }
        greedy = engine.generate(ids, SamplingConfig(max_new_tokens=64, temperature=0.0), 1).to("cuda")
        mg = greedy.completion_mask.bool()
        g32 = trainer_logprobs(model, greedy, False)
        out["mismatch_greedy_tokens"] = {
            # greedy log-probs of the engine are those of temperature 0 (processed): compare trainer dtypes only
            "trainer_bf16_vs_fp32": stats(
                (trainer_logprobs(copy.deepcopy(model).to(torch.bfloat16), greedy, False) - g32)[mg]
            ),
            "trainer_autocast_vs_fp32": stats((trainer_logprobs(model, greedy, True) - g32)[mg]),
        }
    engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), help="names; a repeated name runs again")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.prompts, args.G, args.max_new_tokens)), flush=True)
        return
    import torch
    import transformers
    import vllm

    result = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__},
        "config": {
            "model": "SmolLM2-135M-Instruct",
            "prompts": args.prompts,
            "G": args.G,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
        },
        "settings": {},
    }
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for i, name in enumerate(args.settings):
        key = name if name not in args.settings[:i] else f"{name}#{args.settings[:i].count(name) + 1}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--out",
                "-",
                "--child",
                name,
                "--prompts",
                str(args.prompts),
                "--G",
                str(args.G),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if line:
            res = json.loads(line[-1].removeprefix("RESULT "))
        else:
            res = {"error": proc.stderr[-2500:]}
        res["process_s"] = time.perf_counter() - t0
        result["settings"][key] = res
        brief = {k: res.get(k) for k in ("tokens_per_s", "ms_per_decode_step", "toggle_s", "async_scheduling",
                                         "startup_s")}
        print(key, json.dumps(brief), flush=True)
        for part in ("mismatch_sampled", "mismatch_greedy_tokens"):
            if part in res:
                print(
                    " ",
                    part,
                    json.dumps(
                        {k: (round(v["mean"], 4) if isinstance(v, dict) else round(v, 3)) for k, v in res[part].items()}
                    ),
                    flush=True,
                )
        if "profile" in res:
            p = res["profile"]
            print(
                f"  profile: wall {p['wall_s']:.3f} s, GPU kernels {p['gpu_kernel_s']:.3f} s, "
                f"{p['decode_steps']} decode steps",
                flush=True,
            )
            for e in p["top_gpu"][:6]:
                print("   gpu", e, flush=True)
            for e in p["top_cpu"][:8]:
                print("   cpu", e, flush=True)
        if "error" in res:
            print(res["error"][-1500:], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
