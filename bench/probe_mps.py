"""Diagnostic: CUDA's Multi-Process Service (MPS) for the trainer and engine processes: memory, IPC, co-running.

The overlapped GRPO step runs two CUDA processes, the trainer and the vLLM engine process. Each holds a context of
its own (about 0.6-0.7 GiB outside PyTorch, bench/results/vs_trl_NOTES.md), and the GPU time-slices their kernels,
so the engine's decode steps wait for the update's slices. Under MPS the clients' work goes through one server:
NVIDIA documents less on-GPU context storage and kernels of different processes running at once. This probe
measures both ways, plain and under a private MPS daemon (its own pipe and log folders, so only the processes
given them are its clients; stopped at the end):

- memory: the device's NVML used memory above the baseline with one and with two client processes, each with a
  context, a cuBLAS bf16 matmul and an SDPA call (the MPS server's own memory included);
- CUDA IPC: a tensor shared from one client process to another (torch.multiprocessing), read back exactly;
- expandable segments: a client allocating and freeing with ``expandable_segments:True`` (the trainer's setting);
- co-running: a client replaying a CUDA graph of a small decode-like step, alone and beside another client's
  large matmuls (median ms a replay).

    python bench/probe_mps.py --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


# ----------------------------------------------------------------------------- client roles (child processes)
def _context_work() -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(4, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()


def role_hold(ready: Path, stop: Path) -> None:
    """Create a context, run a matmul and SDPA, then hold until ``stop`` exists."""
    _context_work()
    ready.write_text("ok")
    while not stop.exists():
        time.sleep(0.05)


def _ipc_reader(queue, result) -> None:  # noqa: ANN001 - torch.multiprocessing queues
    t = queue.get()
    result.put(float(t.double().sum().item()))


def role_ipc() -> dict:
    """Share a CUDA tensor with a spawned process through CUDA IPC and check what it reads."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, result = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_reader, args=(queue, result))
    proc.start()
    t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    queue.put(t)
    got = result.get(timeout=120)
    proc.join(timeout=60)
    want = float(t.double().sum().item())
    return {"ipc_ok": got == want, "ipc_read": got, "ipc_expected": want}


def role_expandable() -> dict:
    """Allocate, free and allocate again with expandable segments (set in the environment before CUDA starts)."""
    import torch

    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    first = int(x.sum().item())
    del x
    torch.cuda.empty_cache()
    y = torch.ones(512 * MiB, dtype=torch.uint8, device="cuda")
    return {"expandable_ok": first == 256 * MiB and int(y.sum().item()) == 512 * MiB,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def role_decode(seconds: float) -> dict:
    """Replay a captured decode-like step (small matmuls and softmaxes) for ``seconds``: median ms a replay."""
    import torch

    x = torch.randn(128, 576, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(576, 576, device="cuda", dtype=torch.bfloat16) / 24 for _ in range(30)]

    def step() -> torch.Tensor:
        h = x
        for w in ws:
            h = torch.softmax(h @ w, dim=-1) @ w.t()
        return h

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"replays": len(times), "median_ms": statistics.median(times),
            "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))]}


def role_load(ready: Path, seconds: float) -> None:
    """Large bf16 matmuls back to back for ``seconds`` (the update's kind of kernel)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    ready.write_text("ok")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(4):
            a @ a
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the orchestrator
def device_used() -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    end = time.time() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a client exited before {path.name}: rc {[p.poll() for p in procs]}")
        if time.time() > end:
            raise TimeoutError(path.name)
        time.sleep(0.05)


def client(role: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc {proc.returncode}: {err[-1500:]}"}
    return json.loads(lines[-1])


def measure(env: dict[str, str], work: Path) -> dict:
    """Every measurement of the module docstring, with client processes started with ``env``."""
    out: dict = {}
    base = device_used()
    stop = work / "stop"
    holders, used = [], []
    try:
        for i in range(2):
            ready = work / f"ready{i}"
            holders.append(client("hold", env, "--ready", str(ready), "--stop", str(stop)))
            wait_for(ready, holders)
            time.sleep(1.0)
            used.append((device_used() - base) / MiB)
        out["used_mib_one_client"], out["used_mib_two_clients"] = used
        out["second_client_mib"] = used[1] - used[0]
    except Exception as err:  # noqa: BLE001 - recorded, the other measurements go on
        out["memory_error"] = repr(err)
    finally:
        stop.write_text("stop")
        for p in holders:
            p.wait(timeout=60)
    out["ipc"] = result_of(client("ipc", env))
    out["expandable"] = result_of(client("expandable", {**env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}))
    out["decode_alone"] = result_of(client("decode", env, "--seconds", "3"))
    ready = work / "load_ready"
    load = client("load", env, "--ready", str(ready), "--seconds", "12")
    try:
        wait_for(ready, [load])
        out["decode_beside_matmuls"] = result_of(client("decode", env, "--seconds", "3"))
    except Exception as err:  # noqa: BLE001
        out["decode_beside_matmuls"] = {"error": repr(err)}
    load.wait(timeout=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--stop", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        roles = {"hold": lambda: role_hold(Path(args.ready), Path(args.stop)), "ipc": role_ipc,
                 "expandable": role_expandable, "decode": lambda: role_decode(args.seconds),
                 "load": lambda: role_load(Path(args.ready), args.seconds)}
        res = roles[args.role]()
        if res is not None:
            print(json.dumps(res), flush=True)
        return

    import torch

    report: dict = {"device": None, "torch": torch.__version__}
    control = shutil.which("nvidia-cuda-mps-control")
    report["mps_control"] = control
    with tempfile.TemporaryDirectory(prefix="probe-mps-") as tmp:
        work = Path(tmp)
        plain_dir, mps_dir = work / "plain", work / "mps"
        plain_dir.mkdir()
        report["plain"] = measure(dict(os.environ), plain_dir)
        print("plain:", json.dumps(report["plain"]), flush=True)
        if control is None:
            report["mps"] = {"error": "nvidia-cuda-mps-control is not on PATH"}
        else:
            (mps_dir / "pipe").mkdir(parents=True)
            (mps_dir / "log").mkdir()
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(mps_dir / "pipe"),
                   "CUDA_MPS_LOG_DIRECTORY": str(mps_dir / "log")}
            started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True)
            report["mps_start"] = {"rc": started.returncode, "out": (started.stdout + started.stderr)[-500:]}
            try:
                if started.returncode == 0:
                    report["mps"] = measure(env, mps_dir)
            finally:
                stopped = subprocess.run([control], input="quit\n", env=env, capture_output=True, text=True)
                report["mps_stop"] = {"rc": stopped.returncode, "out": (stopped.stdout + stopped.stderr)[-300:]}
                time.sleep(1.0)
                logs = sorted((mps_dir / "log").glob("*"))
                report["mps_logs"] = {p.name: p.read_text()[-1500:] for p in logs}
            print("mps:", json.dumps(report.get("mps")), flush=True)
    import pynvml

    pynvml.nvmlInit()
    report["device"] = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
