"""What PyTorch's allocator held at its peak during one recorded stretch, grouped by where it was allocated.

A diagnostic for the benches: ``record()`` starts PyTorch's allocation history, ``peak_report()`` replays it to
the moment the allocated bytes were highest and sums the live allocations by the first frame of the project,
transformers or peft that made them (the tensors allocated before recording started count as one line).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

_OWN = ("lightning_rl", "kernels/", "transformers/", "peft/", "bench/", "torch/optim", "torch/utils/checkpoint")


def record(max_entries: int = 2_000_000, stacks: bool = False) -> int:
    """Start recording allocations. Returns the bytes allocated now, the replay's start.

    With ``stacks`` each allocation keeps its Python stack. On an H200 (torch 2.11) that crashed the compiled
    decoder layers' forward (``SystemError`` from ``autograd.Function.apply``), so by default only sizes are kept.
    """
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="all" if stacks else None,
                                             stacks="python")
    return torch.cuda.memory_allocated()


def stop() -> dict[str, Any]:
    """The recorded snapshot; recording stops."""
    import torch

    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snap


def site(frames: list[dict[str, Any]]) -> str:
    """``file:line function`` of the first frame in the project, transformers, peft or the optimizer, else the first."""
    chosen = next((f for f in frames if any(k in f.get("filename", "") for k in _OWN)), frames[0] if frames else None)
    if chosen is None:
        return "(no stack)"
    name = chosen.get("filename", "?")
    for marker in _OWN:
        if marker in name:
            name = name[name.index(marker):]
            break
    return f"{name}:{chosen.get('line', '?')} {chosen.get('name', '?')}"


def peak_report(snapshot: dict[str, Any], start_allocated: int, top: int = 30) -> dict[str, Any]:
    """Replay the trace: the peak of allocated bytes, its live allocations by site and by size.

    Args:
        snapshot: ``torch.cuda.memory._snapshot()`` after :func:`record`.
        start_allocated: :func:`record`'s return value (bytes allocated before the trace began).
        top: sites listed.
    """
    traces = [t for t in snapshot.get("device_traces", []) if t]
    events = traces[0] if traces else []
    cur, peak, peak_at = start_allocated, start_allocated, -1
    for i, ev in enumerate(events):
        action = ev.get("action")
        if action == "alloc":
            cur += ev["size"]
        elif action == "free_completed":
            cur -= ev["size"]
        if cur > peak:
            peak, peak_at = cur, i
    live: dict[int, tuple[int, str]] = {}
    streams: dict[int, int] = {}  # address -> the stream of the live allocation there
    earlier = start_allocated  # what was allocated before the trace and still is
    for ev in events[: peak_at + 1]:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], site(ev.get("frames") or []))
            streams[ev["addr"]] = ev.get("stream", 0)
        elif action == "free_completed" and live.pop(ev["addr"], None) is None:
            earlier -= ev["size"]
    live[-1] = (earlier, "(allocated before the recorded stretch)")
    by_site: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for size, where in live.values():
        by_site[where] += size
        counts[where] += 1
    rows = sorted(by_site.items(), key=lambda kv: -kv[1])[:top]
    by_size: dict[int, int] = defaultdict(int)  # the backward's allocations all name the backward call: sizes tell
    for size, _ in live.values():
        by_size[size] += 1
    sizes = sorted(by_size.items(), key=lambda kv: -kv[0] * kv[1])[:top]
    peak_frames = (events[peak_at].get("frames") or [])[:8] if peak_at >= 0 else []
    by_stream: dict[int, int] = defaultdict(int)  # each stream's freed blocks are cached apart from the others'
    for addr, (size, _) in live.items():
        if addr in streams:
            by_stream[streams[addr]] += size
    # the memory the allocator took from the driver during the stretch (segments, or pages of expandable ones)
    grown, grown_peak, allocated_then = 0, 0, 0
    cur = start_allocated
    for ev in events:
        action = ev.get("action")
        if action == "alloc":
            cur += ev["size"]
        elif action == "free_completed":
            cur -= ev["size"]
        elif action in ("segment_alloc", "segment_map"):
            grown += ev["size"]
            if grown > grown_peak:
                grown_peak, allocated_then = grown, cur
        elif action in ("segment_free", "segment_unmap"):
            grown -= ev["size"]
    return {
        "events": len(events),
        "start_allocated_gib": start_allocated / 2**30,
        "peak_allocated_gib": peak / 2**30,
        "peak_event_stack": [f"{f.get('filename', '?')}:{f.get('line', '?')} {f.get('name', '?')}"
                             for f in peak_frames],
        "live_at_peak_by_stream_mib": {str(k): round(v / 2**20, 1) for k, v in by_stream.items()},
        "segments_grown_peak_mib": round(grown_peak / 2**20, 1),
        "allocated_when_segments_peaked_gib": allocated_then / 2**30,
        "live_at_peak_by_site": [{"site": s, "mib": round(b / 2**20, 1), "tensors": counts[s]} for s, b in rows],
        "live_at_peak_by_size": [{"mib_each": round(n / 2**20, 2), "tensors": c, "mib": round(n * c / 2**20, 1)}
                                 for n, c in sizes],
    }


__all__ = ["peak_report", "record", "site", "stop"]
