"""A run stopped after any step and resumed from last.ckpt ends bit-identical to the uninterrupted run (CPU).

Weights (``torch.equal``), the prompts of every step and their rewards: for GRPO and PPO (sampled
rollouts, PPO's shuffled mini-batches and value-head dropout) and DPO (precomputed reference), mid-epoch
and at an epoch boundary (3 batches an epoch). The resumed run starts from another seed, so only what
the checkpoint holds can make it match.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import resume_runs
import torch
from resume_runs import STEPS, fit, save_base

HERE = Path(__file__).parent
# the script imports helpers from tests/: pytest's pythonpath option reaches only pytest's own process
PYTHONPATH = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference runs, one per method (shared by the tests of this file)."""
    cache = {}
    resume_runs.BASE_DIR = save_base(tmp_path_factory.mktemp("base") / "tiny")

    def get(kind):
        if kind not in cache:
            cache[kind] = fit(kind, 0, tmp_path_factory.mktemp(f"full_{kind}"))
        return cache[kind]

    return get


def assert_resumed_like(full, resumed, stopped_after):
    (module_a, rec_a), (module_b, rec_b) = full, resumed
    later = sorted(rec_a.steps)[stopped_after:]
    assert len(later) == STEPS - stopped_after and sorted(rec_b.steps) == later
    for step in later:
        assert rec_b.steps[step] == rec_a.steps[step], (step, rec_b.steps[step], rec_a.steps[step])
    a, b = module_a.state_dict(), module_b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("kind", "stop_after"),
    [("GRPO", 2), ("GRPO", 3), ("PPO", 4), ("DPO", 5), ("GRPO-LoRA", 4), ("GRPO-masters", 2)],
    ids=["grpo-mid-epoch", "grpo-epoch-end", "ppo-mid-epoch", "dpo-mid-epoch", "grpo-lora-plugin-mid-epoch",
         "grpo-host-masters-mid-epoch"])
def test_stopped_run_resumes_exactly(uninterrupted, tmp_path, kind, stop_after):
    full = uninterrupted(kind)
    _, first = fit(kind, 0, tmp_path, stop_after=stop_after)
    assert len(first.steps) == stop_after
    if kind == "GRPO-LoRA":  # the checkpoint holds the adapters; the bf16 base comes back from its directory
        saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
        assert all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k][:3]
    if kind == "GRPO-masters":  # the checkpoint holds the fp32 masters of the bf16 linear weights
        saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
        assert all(v.dtype == torch.float32 for v in saved.values())
    resumed = fit(kind, 1234, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt")
    assert_resumed_like(full, resumed, stop_after)


def test_sigkilled_run_resumes_exactly(uninterrupted, tmp_path):
    """The first part runs in its own process, killed with SIGKILL at the start of its 5th batch."""
    proc = subprocess.run([sys.executable, str(HERE / "resume_runs.py"), "GRPO", str(tmp_path), "4"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = fit("GRPO", 1234, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt")
    assert_resumed_like(uninterrupted("GRPO"), resumed, 4)
