"""Where a profiled step's CPU time goes, by Python function (a profile taken ``with_stack=True``).

A small model's update is bound by the CPU: the GPU idles while Python, the dispatcher and kernel launches run.
torch's operator table says which operators cost CPU time, not which code calls them. With ``with_stack=True`` the
profiler also records each Python call as an event (``file(line): function``) whose children are the calls and
operators below it. This file adds those events up by function, like cProfile's cumulative view: a function's
total is the CPU time from its entry to its return (operators, launches and Python below it), its self time the
Python that ran in it between its children. A call inside another call of the same function counts once.

    python bench/profile_sources.py  # a CPU demonstration on a tiny LoRA model
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

_PYTHON_CALL = re.compile(r"^(.+\(\d+\): |<built-in |nn\.Module: )")
_TORCH_PROFILER = re.compile(r"torch/(autograd/)?profiler")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def function_name(event: Any) -> str:
    """A Python call event's function, without the object address of a built-in method's receiver."""
    return _ADDRESS.sub("", event.name)


def is_python_call(event: Any) -> bool:
    """Whether a profiler event is a Python call (``with_stack``), not an operator or a CUDA runtime call."""
    return bool(_PYTHON_CALL.match(event.name))


def cpu_by_function(events: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Calls, total and self CPU time (µs) of each Python function among the events of one profile.

    Args:
        events: ``torch.profiler`` function events (``prof.events()``) of a profile taken ``with_stack=True``.

    Returns:
        ``{"file(line): function": {"calls": ..., "total_us": ..., "self_us": ...}}``; the profiler's own calls
        are left out.
    """
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0.0, "total_us": 0.0, "self_us": 0.0})
    for event in events:
        if not is_python_call(event) or _TORCH_PROFILER.search(event.name):
            continue
        name = function_name(event)
        row = out[name]
        row["self_us"] += float(event.self_cpu_time_total)
        parent, nested = getattr(event, "cpu_parent", None), False
        while parent is not None and not nested:
            nested = function_name(parent) == name
            parent = getattr(parent, "cpu_parent", None)
        if not nested:
            row["calls"] += 1
            row["total_us"] += float(event.cpu_time_total)
    return dict(out)


def function_table(events: Iterable[Any], rows: int = 40, sort_by: str = "total_us",
                   only: str | None = None) -> str:
    """The ``rows`` functions with the most ``sort_by`` CPU time (``total_us`` or ``self_us``), as text.

    ``only``: a regular expression the function's ``file(line): name`` must match (e.g. ``lightning_rl|peft``).
    """
    table = cpu_by_function(events)
    picked = [(k, v) for k, v in table.items() if only is None or re.search(only, k)]
    picked = sorted(picked, key=lambda kv: -kv[1][sort_by])[:rows]
    lines = [f"{'total ms':>10} {'self ms':>9} {'calls':>7}  function"]
    lines += [f"{v['total_us'] / 1000:10.2f} {v['self_us'] / 1000:9.2f} {int(v['calls']):7d}  {k}"
              for k, v in picked]
    return "\n".join(lines)


def _demo() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    net = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2))
    net = get_peft_model(net, LoraConfig(r=8, target_modules="all-linear"))
    ids = torch.randint(0, 256, (8, 32))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        net(input_ids=ids, labels=ids).loss.backward()
    print(function_table(prof.events(), rows=15))
    print(function_table(prof.events(), rows=10, sort_by="self_us", only="peft|transformers"))


if __name__ == "__main__":
    _demo()
