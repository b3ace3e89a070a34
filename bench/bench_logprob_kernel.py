"""Benchmark: per-token log-probs + entropy from hidden states, forward + backward, on one GPU.

Compares the Triton kernel with eager torch (full logits, log_softmax, gather, entropy), the same
eager function under torch.compile, and the chunked pure-torch reference. Reports time, peak extra
memory (``max_memory_allocated`` minus what was allocated before the call: inputs and upstream
gradients), and the roofline ``8*N*H*V`` flop at 790 TFLOP/s. Results go to ``--out`` as JSON,
rewritten after every shape so a timeout still leaves the finished part.

Usage: ``python bench/bench_logprob_kernel.py [--out PATH] [--budget-s 330] [--no-compile]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import triton
from lightning_rl.kernels.reference import token_logprobs_entropy_reference
from lightning_rl.kernels.triton_logprobs import GPU_CONFIG, token_logprobs_entropy_triton

DEVICE = "cuda"
PEAK_TFLOPS = 790.0
SHAPES = [
    {"name": "qwen2.5-1.5b_n8192", "n": 8192, "h": 1536, "v": 151936},
    {"name": "qwen2.5-1.5b_n1024", "n": 1024, "h": 1536, "v": 151936},
    {"name": "llama3-8b_n8192", "n": 8192, "h": 4096, "v": 128256},
]
SWEEP = [  # alternative tilings tried on the first shape (same config for forward and dz kernels)
    {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"dz_chunk_bytes": 128 << 20},
]


def eager(hidden, weight, targets):
    z = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def make_step(fn, hidden, weight, targets, g_logp, g_ent):
    def step():
        logp, ent = fn(hidden, weight, targets)
        return torch.autograd.grad([logp, ent], [hidden, weight], [g_logp, g_ent])

    return step


def time_ms(fn, budget_s=1.5, warmup=2, min_iters=3, max_iters=50):
    """Median wall time of ``fn`` in ms with CUDA events, after warmup."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    iters = int(min(max_iters, max(min_iters, budget_s / max(est, 1e-6))))
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_extra_bytes(fn):
    """Peak memory above the current allocation while ``fn`` runs (its returned grads included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def measure(step, grad_bytes):
    try:
        return _measure(step, grad_bytes)
    except Exception as err:  # OOM or a compiler failure: record it, keep benchmarking the rest
        torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def _measure(step, grad_bytes):
    ms = time_ms(step)
    extra = peak_extra_bytes(step)
    return {"ms": ms, "extra_mib": extra / 2**20, "extra_minus_grads_mib": (extra - grad_bytes) / 2**20}


def bench_shape(shape, args, deadline, sweep):
    n, h, v = shape["n"], shape["h"], shape["v"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * (2.0 / h**0.5)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    g_logp, g_ent = torch.randn(n, device=DEVICE, generator=g), torch.randn(n, device=DEVICE, generator=g)
    grad_bytes = (n * h + v * h) * 2
    flop = 8 * n * h * v
    roofline_ms = flop / (PEAK_TFLOPS * 1e12) * 1e3
    res = {"config": shape, "dtype": "bfloat16", "flop": flop, "roofline_ms": roofline_ms, "methods": {}}
    m = res["methods"]

    with torch.no_grad():
        res["gemm_hW_ms"] = time_ms(lambda: hidden @ weight.t())  # one 2NHV GEMM through cuBLAS
        res["triton_forward_ms"] = time_ms(lambda: token_logprobs_entropy_triton(hidden, weight, targets))
        res["eager_forward_ms"] = time_ms(lambda: eager(hidden, weight, targets))

    def triton_fn(cfg=None):
        return lambda a, b, c: token_logprobs_entropy_triton(a, b, c, config=cfg)

    m["triton"] = measure(make_step(triton_fn(), hidden, weight, targets, g_logp, g_ent), grad_bytes)
    m["eager"] = measure(make_step(eager, hidden, weight, targets, g_logp, g_ent), grad_bytes)
    if not args.no_compile and time.monotonic() < deadline - 90:
        compiled = torch.compile(eager, dynamic=False)
        t0 = time.perf_counter()
        m["compile"] = measure(make_step(compiled, hidden, weight, targets, g_logp, g_ent), grad_bytes)
        m["compile"]["first_call_to_done_s"] = time.perf_counter() - t0
    if time.monotonic() < deadline - 30:
        m["reference_chunk1024"] = measure(
            make_step(token_logprobs_entropy_reference, hidden, weight, targets, g_logp, g_ent), grad_bytes
        )
    for key in m:
        if "ms" in m[key] and "ms" in m["triton"]:
            m[key]["x_roofline"] = m[key]["ms"] / roofline_ms
            m[key]["speedup_of_triton"] = m[key]["ms"] / m["triton"]["ms"]
    if sweep:
        res["sweep"] = []
        for cfg in SWEEP:
            if time.monotonic() > deadline - 20:
                break
            step = make_step(triton_fn(cfg), hidden, weight, targets, g_logp, g_ent)
            res["sweep"].append({"override": cfg, **measure(step, grad_bytes)})
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip optional parts past this")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    device = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / f"logprob_kernel_{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "triton_config": GPU_CONFIG,
        "peak_tflops_assumed": PEAK_TFLOPS,
        "timing": "median of CUDA-event times after 2 warmups; forward + backward (autograd.grad of logp, entropy)",
        "results": [],
    }
    for i, shape in enumerate(SHAPES):
        if time.monotonic() > deadline:
            break
        res = bench_shape(shape, args, deadline, sweep=i == 0)
        report["results"].append(res)
        out.write_text(json.dumps(report, indent=2))
        brief = {k: round(v["ms"], 2) if "ms" in v else v["error"] for k, v in res["methods"].items()}
        print(shape["name"], f"roofline {res['roofline_ms']:.2f} ms", brief, flush=True)
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
