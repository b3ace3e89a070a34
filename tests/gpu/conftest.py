"""Fixtures of the GPU tests."""

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench():
    """``bench/bench_precision.py`` as a module: seeded GRPO fits on CUDA with their peak memory."""
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_precision.py"
    spec = importlib.util.spec_from_file_location("bench_precision", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_precision", mod)
    spec.loader.exec_module(mod)
    return mod
