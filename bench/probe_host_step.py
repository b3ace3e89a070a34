"""Time one optimizer step of host-master weights several ways: streamed through the device, streamed with overlapped
copies, run by the CPU (``MemoryAwarePrecision(step_on_host=True)``), or a share by each at once (``step_on_host=0.5``).

Run on the GPU machine: ``python3 bench/probe_host_step.py --shape qwen05 --out FILE``. The parameters have a model
shape's linear weights and embeddings (bf16 on the device, fp32 masters in pinned host memory, gradients sent to
host memory by a backward, AdamW with the modules' settings); norms and biases are left out, as they stream either
way. Writes the device name, versions, CPU threads and, per way, the step's seconds (median of ``--steps`` after
one warm-up step) and its device peak above the weights. A diagnostic of one part: the end-to-end comparison is
``bench/bench_vs_trl.py`` with ``'host={"plugin":{"step_on_host":true}}'``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from lightning_rl.plugins.host_gradients import HostGradients
from lightning_rl.plugins.host_masters import HostMasterWeights
from lightning_rl.plugins.streamed_states import StreamedOptimizerStates

# hidden, layers, kv heads x head dim, MLP, vocab, tied
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a CPU run checks the script only
SHAPES = {"smollm2": (576, 30, 3 * 64, 1536, 49152, True), "qwen05": (896, 24, 2 * 64, 4864, 151936, False)}


def model(shape: str) -> nn.Module:
    """The shape's linear weights and embeddings (no norms, biases or forward), on the device."""
    h, n, kv, mlp, vocab, tied = SHAPES[shape]
    layers = nn.ModuleList()
    for _ in range(n):
        layers.append(nn.ModuleDict({
            "q": nn.Linear(h, h, bias=False), "k": nn.Linear(h, kv, bias=False), "v": nn.Linear(h, kv, bias=False),
            "o": nn.Linear(h, h, bias=False), "gate": nn.Linear(h, mlp, bias=False),
            "up": nn.Linear(h, mlp, bias=False), "down": nn.Linear(mlp, h, bias=False)}))
    out = nn.ModuleDict({"embed": nn.Embedding(vocab, h), "layers": layers})
    if not tied:
        out["head"] = nn.Linear(h, vocab, bias=False)
    return out.to(DEVICE)


def backward(net: nn.Module, step: int) -> None:
    """A backward that gives every weight a gradient (what it is does not change the step's time)."""
    loss = sum((p.float() * (1e-3 * (step + 1))).sum() for p in net.parameters())
    loss.backward()


def measure(shape: str, way: str, steps: int) -> dict:
    """One way's seconds per step and device peak above the weights.

    ``streamed``, ``overlapped`` (copies on side streams) or ``host``; ``host:S`` steps the share S of the elements
    on the host while the rest streams (``host:S/overlapped``: with overlapped copies; ``host:auto``: the share
    balanced after every step, its last value recorded); ``@N`` after any of them runs the CPU's work on N
    threads.
    """
    way, _, threads = way.partition("@")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _measure(shape, way, steps)
    finally:
        torch.set_num_threads(before)


def _measure(shape: str, way: str, steps: int) -> dict:
    torch.manual_seed(0)
    net = model(shape)
    masters = HostMasterWeights(torch.bfloat16)
    masters.attach(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    masters.watch_optimizer(opt)
    held = HostGradients()
    held.attach(masters.parameters())
    kind, _, rest = way.partition(":")
    share, _, copies = rest.partition("/")
    host_step = (share if share == "auto" else float(share)) if share else kind == "host"
    streamer = StreamedOptimizerStates(chunk_bytes=128 << 20, split_large=True, host_step=host_step,
                                       overlap_copies="overlapped" in (kind, copies))
    streamer.masters, streamer.gradients = masters, held
    seconds, peaks = [], []
    cuda = DEVICE.type == "cuda"
    for step in range(steps + 1):
        backward(net, step)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        streamer.step(opt)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step makes the states
            seconds.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - base if cuda else 0)
    params = sum(p.numel() for p in masters.parameters())
    share = streamer.host_share if host_step == "auto" else None
    del net, opt, streamer, masters, held
    if cuda:
        torch.cuda.empty_cache()
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "peak_mib": max(peaks) / 2**20,
            "params": params, "auto_share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen05")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ways", default="streamed,overlapped,host",
                        help="comma-separated: streamed, overlapped, host, host:SHARE[/overlapped], each with an "
                             "optional @N (N CPU threads)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "shape": args.shape,
              "ways": {}}
    for way in args.ways.split(","):
        result["ways"][way] = measure(args.shape, way, args.steps)
        row = result["ways"][way]
        print(f"{args.shape} {way:10s} {row['seconds']:.3f} s/step, peak {row['peak_mib']:.0f} MiB "
              f"({row['params'] / 1e6:.0f}M parameters)", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
