"""Precomputed reference log-probs over two processes fed by a plain DataLoader (no PreferenceDataModule)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

RUN = Path(__file__).with_name("precomputed_reference_ranks.py")
TESTS = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(TESTS / "integration"),
                                                                 os.environ.get("PYTHONPATH")]))}


def test_every_process_holds_every_rows_reference_for_a_reshuffled_epoch(saved_tiny_llama, tmp_path):
    """Each process precomputes the rows its sampler gives it; the next epoch reshuffles the rows over the
    processes, so each needs the others' too (one process raised for rows it never computed while the other
    waited for it forever), and rank 0's checkpoint must hold them all for a resumed run."""
    out = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, str(RUN), "--model", str(saved_tiny_llama(1)), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out)
    assert result["steps"] == 8  # 16 rows, 2 processes x 2 rows a step, 2 epochs
    assert result["cached"] == list(range(16))
