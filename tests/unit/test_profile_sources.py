"""bench/profile_sources.py: a profile's CPU time added up by Python function, as cProfile's cumulative view."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from profile_sources import cpu_by_function, function_table  # noqa: E402


def _event(name, total, self_us, parent=None):
    return SimpleNamespace(name=name, cpu_time_total=total, self_cpu_time_total=self_us, cpu_parent=parent)


def test_a_recursive_function_counts_its_outer_call_once_and_addresses_are_dropped():
    outer = _event("a.py(1): f", 100.0, 10.0)
    inner = _event("a.py(1): f", 60.0, 5.0, outer)  # f called from f: inside the outer call's total
    op = _event("aten::mm", 55.0, 55.0, inner)
    m1 = _event("<built-in method sum of Tensor object at 0x7f00>", 3.0, 3.0, outer)
    m2 = _event("<built-in method sum of Tensor object at 0x7f99>", 4.0, 4.0, outer)
    table = cpu_by_function([outer, inner, op, m1, m2])
    assert table["a.py(1): f"] == {"calls": 1, "total_us": 100.0, "self_us": 15.0}
    assert table["<built-in method sum of Tensor object>"] == {"calls": 2, "total_us": 7.0, "self_us": 7.0}
    assert "aten::mm" not in table  # operators are charged to the functions above them, not listed


def test_a_real_profile_charges_a_backward_to_its_python_caller():
    x = torch.randn(32, 32, requires_grad=True)

    def step():
        (x @ x).relu().sum().backward()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        step()
    table = cpu_by_function(prof.events())
    step_row = next(v for k, v in table.items() if k.endswith(": step"))
    backward_row = next(v for k, v in table.items() if k.endswith(": backward") and "_tensor.py" in k)
    assert step_row["calls"] == 1 and 0 < backward_row["total_us"] <= step_row["total_us"]
    assert "step" in function_table(prof.events(), rows=50, only="step")
