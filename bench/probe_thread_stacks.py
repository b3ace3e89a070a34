"""Diagnostic: what lowering the CUDA per-thread stack limit to 0 frees, and which launches still run after it.

Each case runs in a fresh process (a failed launch ends its CUDA context). Prints one JSON line per case.
Usage: python bench/probe_thread_stacks.py [OUT_JSON]

Run once, on an H200 (``results/probe_thread_stacks_2026-12-03d_NVIDIA_H200.json``). Read its ``same`` fields with
care: the eager case's list includes a fresh ``randperm``, so ``same`` is False there whatever the stack did; the
graph cases compare replays of one graph, where it means what it says.
"""

from __future__ import annotations

import json
import subprocess
import sys

_COMMON = r"""
import ctypes, json, torch
drv = ctypes.CDLL("libcuda.so.1")
drv.cuCtxGetLimit.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
drv.cuCtxSetLimit.argtypes = [ctypes.c_int, ctypes.c_size_t]
def limit():
    torch.cuda.synchronize(); v = ctypes.c_size_t(); drv.cuCtxGetLimit(ctypes.byref(v), 0); return v.value
def release():
    free0 = torch.cuda.mem_get_info()[0]; found = limit(); rc = drv.cuCtxSetLimit(0, 0)
    return {"found": found, "set_rc": rc, "freed_mib": (torch.cuda.mem_get_info()[0] - free0) / 2**20}
x = torch.randn(1024, 1024, device="cuda")
def eager():
    return [(x @ x).sum(), torch.sort(x.flatten())[0][:10].sum(), x.softmax(-1).sum(), x.cumsum(0).sum(),
            torch.topk(x, 5).values.sum(), x[torch.randperm(1024, device="cuda")].sum()]
def graph():
    static = x.clone(); g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (static @ static).softmax(-1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = (static @ static).softmax(-1)
    return g, out
"""

CASES = {
    "eager_after_release": _COMMON + r"""
ref = [float(t) for t in eager()]
r = release(); after = [float(t) for t in eager()]; torch.cuda.synchronize()
print(json.dumps({**r, "same": after == ref, "limit_after_work": limit()}))
""",
    "graph_captured_before_release": _COMMON + r"""
g, out = graph(); g.replay(); ref = out.clone()
r = release(); g.replay(); torch.cuda.synchronize()
print(json.dumps({**r, "same": bool(torch.equal(out, ref)), "limit_after_work": limit()}))
""",
    "graph_captured_after_release": _COMMON + r"""
r = release(); g, out = graph(); g.replay(); torch.cuda.synchronize(); first = out.clone(); g.replay()
torch.cuda.synchronize()
print(json.dumps({**r, "same": bool(torch.equal(out, first)), "limit_after_work": limit()}))
""",
    "graph_before_release_eager_first": _COMMON + r"""
g, out = graph(); g.replay(); ref = out.clone()
r = release(); eager(); torch.cuda.synchronize(); mid = limit(); g.replay(); torch.cuda.synchronize()
print(json.dumps({**r, "limit_after_eager": mid, "same": bool(torch.equal(out, ref)), "limit_after_work": limit()}))
""",
}


def main() -> None:
    results = {}
    for name, script in CASES.items():
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else None
        results[name] = json.loads(line) if line else {"failed": p.stderr.strip().splitlines()[-1:]}
        print(name, results[name], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": __import__("torch").cuda.get_device_name(), "torch": __import__("torch").__version__,
                       "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
