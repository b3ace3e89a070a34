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
    before it, so its timings and peaks do not depend on the order the tests ran in. (A host-masters memory test
    failed after the compiled-layer tests in one process; each model now compiles its own copy of the layer code,
    but dynamo's other caches and PyTorch's allocator still carry over.)"""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    yield
