"""Diagnostic: what a CUDA process holds outside PyTorch's allocator, stage by stage, and what a stack reset gives back.

The bench's trainer and engine processes each hold about 0.73 GiB that PyTorch's allocator does not account
for (bench/results/vs_trl_NOTES.md). This probe runs, in one process, the kinds of work a trainer does (a cuBLAS
matmul, flash attention, an inductor-compiled function, the Triton log-prob kernel forward and backward) and
writes after each the process's NVML figure, PyTorch's reserved bytes and the CUDA stack limit; then it sets the
stack limit to a few values and writes the NVML figure after each.

    python bench/probe_context_memory.py --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import ctypes

    from lightning_rl.cuda_limits import stack_limit

    def set_stack_limit(nbytes: int) -> bool:  # unsafe beside CUDA graphs: a probe's own process only
        return ctypes.CDLL("libcuda.so.1").cuCtxSetLimit(0, ctypes.c_size_t(nbytes)) == 0

    stages: list[dict] = []

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        nvml = process_bytes()
        reserved = torch.cuda.memory_reserved()
        stages.append({"stage": name, "nvml_mib": None if nvml is None else nvml / 2**20,
                       "torch_reserved_mib": reserved / 2**20,
                       "outside_torch_mib": None if nvml is None else (nvml - reserved) / 2**20,
                       "stack_limit_bytes": stack_limit()})
        print(stages[-1], flush=True)

    torch.zeros(1, device="cuda")
    mark("context")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    mark("cublas bf16 matmul")
    x = torch.randn(8, 14, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()
    mark("sdpa forward+backward")
    f = torch.compile(lambda t: torch.nn.functional.silu(t) * t + 1)
    f(a).sum().item()
    mark("inductor elementwise")
    from lightning_rl.kernels.triton_logprobs import token_logprobs_entropy_triton

    h = torch.randn(8192, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(151936, 896, device="cuda", dtype=torch.float32, requires_grad=True)
    t = torch.randint(0, 151936, (8192,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, ent = token_logprobs_entropy_triton(h, w, t)
    (logp.sum() + ent.sum()).backward()
    del h, w, t, logp, ent
    mark("triton log-prob kernel forward+backward")
    del a, x
    torch.cuda.empty_cache()
    mark("after empty_cache")
    for limit in (stack_limit() or 1024, 1024, 512, 0):
        ok = set_stack_limit(limit)
        mark(f"stack limit set to {limit} ({'accepted' if ok else 'refused'})")
    props = torch.cuda.get_device_properties(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "sms": props.multi_processor_count,
              "max_threads_per_sm": getattr(props, "max_threads_per_multi_processor", None), "stages": stages}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
