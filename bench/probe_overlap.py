"""Diagnostic: can the next rollout overlap the current update in one process?

Times, on one GPU and in one process, a vLLM ``generate`` of G x prompts completions alone, one training
step (forward + backward + AdamW, bf16 autocast over fp32 weights, gradient checkpointing, the Triton
log-prob kernel) alone, and both at once with ``generate`` in a background thread, for a few settings of
the interpreter's switch interval and CUDA streams. Overlap pays when ``both`` is well below
``generate + train``.

    python bench/probe_overlap.py --model DIR --out OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from lightning_rl.logprobs import completion_logprobs
    from lightning_rl.models import load_policy
    from lightning_rl.prompting import encode_prompts
    from lightning_rl.rollout import EngineSettings, SamplingConfig
    from lightning_rl.rollout.vllm import VLLMEngine

    net, tok = load_policy(args.model, dtype="float32")
    net.cuda().train()
    net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) \
        if hasattr(net, "activation_checkpointing_enable") else \
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts = [f"What is {10 + i} + {40 + 3 * i}? Answer with just the number." for i in range(args.prompts)]
    ids = encode_prompts(tok, prompts, None, True, 256, False)
    eos = [tok.eos_token_id]
    engine = VLLMEngine(net, eos, tok.pad_token_id, max_model_len=128 + args.max_new_tokens,
                        max_num_seqs=args.prompts * args.G,
                        settings=EngineSettings(kv_cache_bytes=2 << 30, dtype="bfloat16", sleep_level=0))
    sampling = SamplingConfig(args.max_new_tokens, 1.0)
    rollout = engine.generate(ids, sampling, args.G).to("cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-7)
    mask = rollout.completion_mask.float()

    def train_step(stream=None):
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
            logp, _ = completion_logprobs(net, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                          rollout.completion_mask, backend="triton")
            loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    def gen():
        engine.generate(ids, sampling, args.G)
        torch.cuda.synchronize()

    def timed(fn, *a):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*a)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def both(stream=None):
        th = threading.Thread(target=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        th.start()
        train_step(stream)
        th.join()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        gen()
        train_step()
    res = {"device": torch.cuda.get_device_name(0), "model": args.model, "prompts": args.prompts, "G": args.G,
           "max_new_tokens": args.max_new_tokens, "tokens": int(mask.sum())}
    med = lambda xs: statistics.median(xs)  # noqa: E731
    res["generate_s"] = med([timed(gen) for _ in range(args.repeats)])
    res["train_s"] = med([timed(train_step) for _ in range(args.repeats)])
    res["both_default_s"] = med([both() for _ in range(args.repeats)])
    side = torch.cuda.Stream()
    res["both_side_stream_s"] = med([both(side) for _ in range(args.repeats)])
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    res["both_switch_0.5ms_s"] = med([both() for _ in range(args.repeats)])
    sys.setswitchinterval(old)
    res["serial_s"] = res["generate_s"] + res["train_s"]
    print(json.dumps(res, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    engine.shutdown()


if __name__ == "__main__":
    main()
