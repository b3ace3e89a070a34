"""Fixtures of the GPU tests."""

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def bench():
    """``bench/bench_precision.py`` as a module: seeded GRPO fits on CUDA with their peak memory."""
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_precision.py"
    spec = importlib.util.spec_from_file_location("bench_precision", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_precision", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each GPU test starts as in a process of its own: no compiled code and no cached device memory of the tests
    before it. All decoder layers of one class share one compiled ``forward`` (one dynamo cache per code object),
    so otherwise a test's layers could run code compiled for an earlier test, or fall back to eager past dynamo's
    recompile limit, and its timings or peaks would depend on the order the tests ran in."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    yield
