"""Diagnostic: what slows the engine's decode steps beside the update, the GPU or the host's cores?

Starts the engine the callback starts by default (:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`,
its front end and engine core in processes of their own) on a policy folder, and times rollouts of the bench's
shape (16 prompts x G=8, 128 new tokens) while a side process runs one load:

- ``none``: nothing beside the engine;
- ``train``: the policy's forward and backward (fp32 weights under bf16 autocast, gradient checkpointing, the
  Triton log-prob kernel) on micro-batches of the update's shape, back to back, one synchronization each;
- ``cpu``: every core busy in PyTorch's intra-op pool (CPU matmuls), as a host optimizer step keeps them;
- ``train-synced``: ``train``, waiting for its own kernels after every decoder layer's forward and before its
  backward (:class:`~lightning_rl.gpu_yield.GPUYield`, always on: the update queues less ahead of the engine);
- ``train+cpu``: both;
- ``gpu-long``: back-to-back bf16 matmuls of about a millisecond each (the GPU kept busy with long kernels).

Per load it writes the rollouts' median engine step (``engine_step_ms``), first step and generate seconds, and the
load's iterations a second beside the engine. A ``train`` figure near ``none`` and a ``cpu`` one far above says
the host's cores slow the engine; the reverse says the GPU's time slices do.

    python bench/probe_engine_contention.py --model DIR --out OUT.json [--loads none,train,cpu]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

LOADS = ("none", "train", "train-synced", "cpu", "train+cpu", "gpu-long")


def _load(kind: str, model_dir: str, ready, stop, counter) -> None:  # noqa: ANN001 (multiprocessing objects)
    """The side process: run ``kind`` until ``stop`` is set, counting iterations in ``counter``."""
    import threading

    import torch

    workers = []
    if "cpu" in kind:
        torch.set_num_threads(os.cpu_count() or 1)
        a = torch.randn(512, 512)

        def spin() -> None:
            while not stop.is_set():
                a @ a  # noqa: B018 (the work is the point)

        workers.append(threading.Thread(target=spin, daemon=True))
    step = None
    if "train" in kind:
        from lightning_rl.logprobs import completion_logprobs
        from lightning_rl.models import load_policy

        net, _ = load_policy(model_dir, dtype="float32")
        net.cuda().train()
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if kind == "train-synced":
            from lightning_rl.gpu_yield import GPUYield

            GPUYield(net, lambda: True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        prompt = torch.randint(0, 1000, (64, 45), device="cuda", generator=gen)
        completion = torch.randint(0, 1000, (64, 128), device="cuda", generator=gen)
        pmask, cmask = torch.ones_like(prompt), torch.ones_like(completion)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logp, _ = completion_logprobs(net, prompt, pmask, completion, cmask, backend="triton")
            logp.mean().backward()
            net.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
    elif kind == "gpu-long":
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

        def step() -> None:
            for _ in range(8):
                x @ x  # noqa: B018
            torch.cuda.synchronize()
    for w in workers:
        w.start()
    if step is not None:
        for _ in range(3):  # warm-up: the Triton kernel's compile, the allocator
            step()
    ready.set()
    while not stop.is_set():
        if step is None:
            time.sleep(0.01)
            continue
        step()
        with counter.get_lock():
            counter.value += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from lightning_rl.models import load_policy
    from lightning_rl.prompting import encode_prompts
    from lightning_rl.rollout import EngineSettings, SamplingConfig
    from lightning_rl.rollout.vllm_process import VLLMProcessEngine

    net, tok = load_policy(args.model, dtype="bfloat16")
    net.cuda().eval()
    prompts = [f"What is {10 + 5 * i} + {40 + 3 * i}? Answer with just the number." for i in range(16)]
    ids = encode_prompts(tok, prompts, None, True, 256, False)
    engine = VLLMProcessEngine(net, [tok.eos_token_id], tok.pad_token_id, max_model_len=512, max_num_seqs=128,
                               settings=EngineSettings(kv_cache_bytes=1 << 30, dtype="bfloat16"))
    sampling = SamplingConfig(128, 1.0)
    engine.generate(ids, sampling, 8, seed=0)  # warm-up
    res: dict = {"device": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "model": args.model,
                 "torch": torch.__version__, "loads": {}}
    ctx = mp.get_context("spawn")
    for kind in args.loads.split(","):
        ready, stop, counter = ctx.Event(), ctx.Event(), ctx.Value("l", 0)
        side = ctx.Process(target=_load, args=(kind, args.model, ready, stop, counter), daemon=True)
        side.start()
        if not ready.wait(180):
            res["loads"][kind] = {"error": "the load did not start in 180 s"}
            side.terminate()
            continue
        before = counter.value
        time.sleep(2.0)
        alone = (counter.value - before) / 2.0  # the load's own rate, the engine idle
        runs = []
        for r in range(args.repeats):
            before, t0 = counter.value, time.perf_counter()
            out = engine.generate(ids, sampling, 8, seed=r + 1)
            wall = time.perf_counter() - t0
            ex = out.extras
            runs.append({"generate_s": wall, "engine_step_ms": ex.get("engine_step_ms"),
                         "engine_step_p90_ms": ex.get("engine_step_p90_ms"),
                         "engine_first_step_s": ex.get("engine_first_step_s"), "engine_steps": ex.get("engine_steps"),
                         "load_iters_per_s": (counter.value - before) / wall})
        stop.set()
        side.join(60)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}
        res["loads"][kind] = {"median": med, "load_alone_iters_per_s": alone, "runs": runs}
        print(kind, json.dumps(med), "load alone", alone, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    engine.shutdown()


if __name__ == "__main__":
    main()
