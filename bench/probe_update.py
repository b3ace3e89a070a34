"""Diagnostic: the GRPO update alone (no engine), eager against compiled decoder layers.

One update step as GRPO runs it on a GPU: forward, recomputed forward and backward of a SmolLM2-135M-shaped
model with random weights (fp32 master weights under bf16 autocast, gradient checkpointing, the Triton
log-prob kernel) over ``N`` sequences of prompt + completion tokens with ragged completion lengths, and an
AdamW step. Seconds per step (median after warm-up), the compile time (first step), kernel launches per step
and peak torch memory, per variant, each in its own process.

    python bench/probe_update.py --out OUT.json [--variants eager,compiled,eager-nockpt,compiled-nockpt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
               rope_theta=100000.0, rms_norm_eps=1e-5)


def one_variant(variant: str, sequences: int, prompt_len: int, new_tokens: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rl.compiled_layers import compile_decoder_layers
    from lightning_rl.logprobs import completion_logprobs
    from lightning_rl.models import enable_activation_checkpointing

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).cuda().train()
    if "nockpt" not in variant:
        enable_activation_checkpointing(net)
    if variant.startswith("compiled"):
        compile_decoder_layers(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, 49152, (sequences, prompt_len), generator=g).cuda()
    prompt_mask = torch.ones_like(prompt_ids)
    lengths = torch.randint(new_tokens // 4, new_tokens + 1, (sequences,), generator=g)
    completion_ids = torch.randint(0, 49152, (sequences, new_tokens), generator=g).cuda()
    completion_mask = (torch.arange(new_tokens)[None] < lengths[:, None]).long().cuda()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp, _ = completion_logprobs(net, prompt_ids, prompt_mask, completion_ids, completion_mask)
        loss = -(logp * completion_mask).sum() / completion_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0:
            torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"variant": variant, "first_step_s": times[0], "s_per_step": statistics.median(times[2:]),
            "step_s": times, "cuda_kernels_per_step": launches,
            "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="eager,compiled,eager-nockpt,compiled-nockpt")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.sequences, args.prompt_len, args.new_tokens, args.steps)))
        return
    import transformers

    report = {"probe": "GRPO update alone, SmolLM2-135M shape, random weights", "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "config": vars(args) | {"variant": None}, "runs": []}
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--out", "-", "--variant", v, "--sequences", str(args.sequences),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        run = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
            {"variant": v, "error": proc.stderr[-2000:]}
        print(json.dumps({k: v for k, v in run.items() if k != "step_s"}), flush=True)
        report["runs"].append(run)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
