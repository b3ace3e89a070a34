"""Benchmark: per-token log-probs + entropy from hidden states, forward + backward, on one GPU.

Per shape, in this order: one cuBLAS ``h @ W.T`` GEMM for scale; the Triton kernel with the default
config and then with each variant / sweep override of ``VARIANTS`` (forward-only time, forward +
backward time, peak extra memory); eager torch (full logits, log_softmax, gather, entropy); the same
eager function under torch.compile (once per shape); optionally (``--reference``) the chunked
pure-torch reference. Peak extra memory is ``max_memory_allocated`` minus what was allocated before
the call (inputs and upstream gradients); ``extra_minus_grads_mib`` also subtracts the returned
``dh``, ``dW``. Roofline: ``8*N*H*V`` flop at 790 TFLOP/s. Every timing is the median of
``--iters`` CUDA-event timings after 2 warmups. Results go to ``--out`` as JSON, rewritten after
every measurement, so a timeout still leaves the finished part; rows past ``--budget-s`` are skipped.

Usage: ``python bench/bench_logprob_kernel.py [--out PATH] [--budget-s 280] [--iters 10] [--no-compile]``
(``--tiny`` runs a small shape, on the CPU through ``TRITON_INTERPRET=1`` when there is no GPU,
to check the script itself.)
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

PEAK_TFLOPS = 790.0
SHAPES = [  # the main shape first, then the memory-target shape
    {"name": "qwen2.5-1.5b_n8192", "n": 8192, "h": 1536, "v": 151936},
    {"name": "llama3-8b_n8192", "n": 8192, "h": 4096, "v": 128256},
    {"name": "qwen2.5-1.5b_n1024", "n": 1024, "h": 1536, "v": 151936},
]
TINY_SHAPES = [{"name": "tiny", "n": 45, "h": 32, "v": 130}]
#: Config overrides measured at every shape, on top of the default config (``{}``).
VARIANTS: dict[str, dict[str, int]] = {
    "default": {},  # TMA loads, 128 x 256 tiles
    "v2_default": {"tma": 0, "BLOCK_V": 128},  # pointer loads, 128 x 128 tiles
    "pointer_loads": {"tma": 0},
    "tma_block_v128": {"BLOCK_V": 128},
    "flatten": {"flatten": 1},
    "even_k": {"tma": 0, "even_k": 1},
    "cublas": {"cublas": 1},
}
#: ``--sweep``: tile / pipeline / chunk settings around the default (every one keeps the scratch at or
#: under 64 MiB).
SWEEP: dict[str, dict[str, int]] = {
    "default": {},
    "stages4": {"num_stages": 4},
    "k128_stages2": {"BLOCK_K": 128, "num_stages": 2},
    "dz16mib": {"dz_chunk_bytes": 16 << 20},
    "dz8mib": {"dz_chunk_bytes": 8 << 20},
    "block_n256_v128": {"BLOCK_N": 256, "BLOCK_V": 128},
    "v2_default": {"tma": 0, "BLOCK_V": 128},
}


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int = 10, warmup: int = 2) -> float:
    """Median time of ``fn`` in ms after ``warmup`` calls (CUDA events; wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory above the current allocation while ``fn`` runs (its returned grads included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def measure(step, grad_bytes: int, device: torch.device, iters: int, forward=None) -> dict:
    """Time (and, on a GPU, peak extra memory of) ``step``; errors are recorded, not raised."""
    try:
        res = {}
        if forward is not None:
            with torch.no_grad():
                res["fwd_ms"] = time_ms(forward, device, iters)
        res["ms"] = time_ms(step, device, iters)
        extra = peak_extra_bytes(step, device)
        if extra is not None:
            res["extra_mib"] = extra / 2**20
            res["extra_minus_grads_mib"] = (extra - grad_bytes) / 2**20
        return res
    except Exception as err:  # OOM, a compiler failure: record it, keep benchmarking the rest
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def bench_shape(shape, args, deadline, device, save, variants):
    """Measure one shape; ``save()`` is called after every row so the JSON stays current."""
    n, h, v = shape["n"], shape["h"], shape["v"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * (2.0 / h**0.5)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    g_logp, g_ent = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    grad_bytes = (n * h + v * h) * 2
    flop = 8 * n * h * v
    roofline_ms = flop / (PEAK_TFLOPS * 1e12) * 1e3
    res = {"config": shape, "dtype": "bfloat16", "flop": flop, "roofline_ms": roofline_ms, "methods": {}}
    m = res["methods"]
    save(res)
    with torch.no_grad():
        res["gemm_hW_ms"] = time_ms(lambda: hidden @ weight.t(), device, args.iters)  # one 2NHV cuBLAS GEMM

    for name, override in variants.items():
        if time.monotonic() > deadline - 10:
            m[f"triton_{name}"] = {"skipped": "budget"}
            continue
        fn = _triton_fn(override)
        step = make_step(fn, hidden, weight, targets, g_logp, g_ent)
        m[f"triton_{name}"] = {
            "override": override,
            **measure(step, grad_bytes, device, args.iters, forward=lambda fn=fn: fn(hidden, weight, targets)),
        }
        save(res)
    if not args.no_eager and time.monotonic() < deadline - 10:
        m["eager"] = measure(make_step(eager, hidden, weight, targets, g_logp, g_ent), grad_bytes, device, args.iters)
        save(res)
    if not args.no_compile and time.monotonic() < deadline - 90:
        compiled = torch.compile(eager, dynamic=False)
        t0 = time.perf_counter()
        m["compile"] = measure(
            make_step(compiled, hidden, weight, targets, g_logp, g_ent), grad_bytes, device, args.iters
        )
        m["compile"]["first_call_to_done_s"] = time.perf_counter() - t0
        save(res)
    if args.reference and time.monotonic() < deadline - 30:
        step = make_step(token_logprobs_entropy_reference, hidden, weight, targets, g_logp, g_ent)
        m["reference_chunk1024"] = measure(step, grad_bytes, device, max(3, args.iters // 3))
    base = m.get("triton_default", {}).get("ms")
    for row in m.values():
        if "ms" in row:
            row["x_roofline"] = row["ms"] / roofline_ms
            if base:
                row["ms_over_triton_default"] = row["ms"] / base
    save(res)
    return res


def _triton_fn(override):
    cfg = dict(override) or None
    return lambda a, b, c: token_logprobs_entropy_triton(a, b, c, config=cfg)


def summary(res: dict) -> str:
    """One line per shape: fwd+bwd ms (and extra MiB beyond the returned grads) of every row."""
    parts = []
    for key, row in res["methods"].items():
        if "ms" in row:
            extra = row.get("extra_minus_grads_mib")
            parts.append(f"{key} {row['ms']:.2f}" + ("" if extra is None else f"/{extra:.0f}MiB"))
        else:
            parts.append(f"{key} {row.get('error', row.get('skipped'))}")
    return f"{res['config']['name']} roofline {res['roofline_ms']:.2f} ms | " + ", ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip the rows that would start past this")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per row (after 2 warmups)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP settings instead of VARIANTS")
    parser.add_argument("--shapes", nargs="*", help="only these shape names")
    parser.add_argument("--reference", action="store_true", help="also time the (slow) chunked reference")
    parser.add_argument("--tiny", action="store_true", help="one small shape: checks the script, times nothing useful")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"logprob_kernel_{name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "triton_config": GPU_CONFIG,
        "variants": SWEEP if args.sweep else VARIANTS,
        "peak_tflops_assumed": PEAK_TFLOPS,
        "timing": f"median of {args.iters} CUDA-event times after 2 warmups; forward + backward "
        "(autograd.grad of logp, entropy); fwd_ms: forward only under no_grad",
        "results": [],
    }

    def save(res):
        if not report["results"] or report["results"][-1] is not res:
            report["results"].append(res)
        out.write_text(json.dumps(report, indent=2))

    shapes = TINY_SHAPES if args.tiny else [s for s in SHAPES if not args.shapes or s["name"] in args.shapes]
    for shape in shapes:
        if time.monotonic() > deadline:
            break
        res = bench_shape(shape, args, deadline, device, save, SWEEP if args.sweep else VARIANTS)
        print(summary(res), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
