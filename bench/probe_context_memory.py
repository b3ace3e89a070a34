"""Diagnostic: what a CUDA process holds outside PyTorch's allocator, stage by stage, and what a stack reset gives back.

The bench's trainer and engine processes each hold about 0.73 GiB that PyTorch's allocator does not account
for (bench/results/vs_trl_NOTES.md). This probe runs, in one process, the kinds of work a trainer does (a cuBLAS
matmul, flash attention, an inductor-compiled function, the Triton log-prob kernel forward and backward) and
writes after each the process's NVML figure, PyTorch's reserved bytes and the CUDA stack limit; then it sets the
stack limit to a few values and writes the NVML figure after each.

    python bench/probe_context_memory.py --out OUT.json
    python bench/probe_context_memory.py --out OUT.json --stages triton --triton-config '{"BLOCK_V": 128}' \
        --shape 16384,576,49152 --frozen-weight

With ``--stages`` a fresh process runs only the named stages, so each stage's growth outside PyTorch is its
own; the Triton stage also records each compiled kernel's registers and spills and times the kernel's forward
and backward at ``--shape`` (tokens, hidden, vocabulary) with the given config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch


def process_bytes() -> int | None:
    """This process's device memory as NVML reports it."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid():
            return int(p.usedGpuMemory)
    return None


def stage_figures(name: str) -> dict:
    """This process's NVML figure, PyTorch's reserve, their difference (MiB) and the CUDA stack limit, after a sync."""
    from lightning_rl.cuda_limits import stack_limit

    torch.cuda.synchronize()
    nvml = process_bytes()
    reserved = torch.cuda.memory_reserved()
    return {"stage": name, "nvml_mib": None if nvml is None else nvml / 2**20,
            "torch_reserved_mib": reserved / 2**20,
            "outside_torch_mib": None if nvml is None else (nvml - reserved) / 2**20,
            "stack_limit_bytes": stack_limit()}


def stage_marker(stages: list[dict]) -> Callable[[str], None]:
    """A function that appends :func:`stage_figures` of a named stage to ``stages`` and prints it."""

    def mark(name: str) -> None:
        stages.append(stage_figures(name))
        print(stages[-1], flush=True)

    return mark


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every compiled log-prob kernel in this process."""
    from lightning_rl.kernels import triton_logprobs_backward as bwd
    from lightning_rl.kernels import triton_logprobs_forward as fwd

    found = []
    for name, fn in (("forward", fwd._forward_kernel), ("reduce", fwd._reduce_chunk_kernel), ("dz", bwd._dz_kernel)):
        for cache in getattr(fn, "device_caches", {}).values():
            table = cache[0] if isinstance(cache, tuple) else cache
            for compiled in table.values():
                found.append({"kernel": name, "n_regs": getattr(compiled, "n_regs", None),
                              "n_spills": getattr(compiled, "n_spills", None),
                              "shared": getattr(compiled.metadata, "shared", None),
                              "num_warps": getattr(compiled.metadata, "num_warps", None)})
    return found


def triton_stage(config: dict, shape: list[int], frozen_weight: bool, mark) -> dict:
    """Run the log-prob kernel forward and backward once (marked), then time five more; its kernels' resources."""
    from lightning_rl.kernels.triton_logprobs import token_logprobs_entropy_triton

    n, hdim, vocab = shape
    h = torch.randn(n, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hdim, device="cuda", dtype=torch.bfloat16) * 0.02 if frozen_weight
         else torch.randn(vocab, hdim, device="cuda", dtype=torch.float32, requires_grad=True))
    t = torch.randint(0, vocab, (n,), device="cuda")

    def once() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp, ent = token_logprobs_entropy_triton(h, w, t, config=config)
        (logp.sum() + ent.sum()).backward()

    once()
    mark("triton log-prob kernel forward+backward")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        once()
    end.record()
    torch.cuda.synchronize()
    return {"config": config, "shape": shape, "frozen_weight": frozen_weight,
            "fwd_bwd_ms": start.elapsed_time(end) / 5, "kernels": compiled_kernels()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="cublas,sdpa,inductor,triton,stack")
    parser.add_argument("--triton-config", default="{}", help="JSON overrides of the kernel's GPU_CONFIG")
    parser.add_argument("--shape", default="8192,896,151936", help="tokens,hidden,vocabulary of the Triton stage")
    parser.add_argument("--frozen-weight", action="store_true", help="bf16 head without a gradient (LoRA)")
    args = parser.parse_args()
    wanted = set(args.stages.split(","))
    import ctypes

    from lightning_rl.cuda_limits import stack_limit

    def set_stack_limit(nbytes: int) -> bool:  # unsafe beside CUDA graphs: a probe's own process only
        return ctypes.CDLL("libcuda.so.1").cuCtxSetLimit(0, ctypes.c_size_t(nbytes)) == 0

    stages: list[dict] = []
    mark = stage_marker(stages)

    torch.zeros(1, device="cuda")
    mark("context")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    if "cublas" in wanted:
        (a @ a).sum().item()
        mark("cublas bf16 matmul")
    if "sdpa" in wanted:
        x = torch.randn(8, 14, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()
        del x
        mark("sdpa forward+backward")
    if "inductor" in wanted:
        f = torch.compile(lambda t: torch.nn.functional.silu(t) * t + 1)
        f(a).sum().item()
        mark("inductor elementwise")
    kernel: dict = {}
    if "triton" in wanted:
        kernel = triton_stage(json.loads(args.triton_config), [int(v) for v in args.shape.split(",")],
                              args.frozen_weight, mark)
    del a
    torch.cuda.empty_cache()
    mark("after empty_cache")
    if "stack" in wanted:
        for limit in (stack_limit() or 1024, 1024, 512, 0):
            ok = set_stack_limit(limit)
            mark(f"stack limit set to {limit} ({'accepted' if ok else 'refused'})")
    props = torch.cuda.get_device_properties(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "sms": props.multi_processor_count,
              "max_threads_per_sm": getattr(props, "max_threads_per_multi_processor", None),
              "args": vars(args), "stages": stages, "triton": kernel}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
