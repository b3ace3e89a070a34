"""Device memory outside PyTorch's allocator taken by side streams, pinned buffers and asynchronous copies.

Run on the GPU machine in a fresh process: ``python3 bench/probe_stream_memory.py STEP,STEP,...`` with steps
``side`` (:func:`lightning_rl.cuda_streams.side_stream`, three names), ``pool`` (``torch.cuda.Stream()``, the pool),
``pinned`` (30 pinned 14 MB buffers), ``copies`` (asynchronous copies to them and back on the last stream made).
Writes ``$OUT/streams_<steps>.json``: the process's NVML figure minus PyTorch's reserved bytes after each step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lightning_rl.cuda_streams import side_stream


def process_mib() -> float:
    """This process's device memory as ``nvidia-smi`` reports it (MiB)."""
    rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    return sum(float(r.split(",")[1]) for r in rows if int(r.split(",")[0]) == os.getpid())


def main(steps: list[str]) -> None:
    """Run ``steps`` in order and print, then write, the memory outside PyTorch after each."""
    rows: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        rows.append((name, process_mib() - torch.cuda.memory_reserved() / 2**20))
        print(f"{name:44s} outside torch {rows[-1][1]:.0f} MiB", flush=True)

    x = torch.randn(12288, 576, device="cuda", dtype=torch.bfloat16)
    y = x @ x.new_ones(576, 576)
    mark("context, first matmul")
    stream = torch.cuda.current_stream()
    buffers: list[torch.Tensor] = []
    for step in steps:
        if step == "side":
            stream = side_stream(x.device, "a")
            side_stream(x.device, "b"), side_stream(x.device, "c")
            mark(f"three side streams ({type(stream).__name__})")
        elif step == "pool":
            stream = torch.cuda.Stream()
            mark("torch.cuda.Stream() (the pool)")
        elif step == "pinned":
            buffers = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for _ in range(30)]
            mark("30 pinned 14 MB buffers")
        elif step == "copies":
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for b in buffers:
                    b.copy_(y, non_blocking=True)
            torch.cuda.current_stream().wait_stream(stream)
            for b in buffers:
                x.copy_(b, non_blocking=True)
            mark("copies to host and back")
            assert torch.equal(x, y), "a copy through the side stream came back changed"
    out = os.path.join(os.environ.get("OUT", "/tmp"), f"streams_{'_'.join(steps)}.json")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "outside_torch_mib": rows}, f)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
