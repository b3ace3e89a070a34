"""Token means of a step's statistics do not depend on how the step was split into micro-batches."""

import math

import torch

from lightning_rl.modules.step_stats import StepStats


def test_token_means_weigh_micro_batches_by_their_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    expected = values[mask].double().mean().item()
    for bounds in ([(0, 4)], [(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)]):  # (2, 3) counts no token
        stats = StepStats()
        for lo, hi in bounds:
            stats.add_token_mean("x", values[lo:hi], mask[lo:hi])
        assert math.isclose(stats.read("cpu")["x"], expected, rel_tol=1e-6), bounds


def test_a_token_mean_or_ratio_over_nothing_is_nan_and_sits_beside_the_other_kinds():
    stats = StepStats()
    stats.add_token_mean("empty", torch.ones(2, 3), torch.zeros(2, 3))
    stats.add("mean", torch.tensor(2.0))
    stats.add("mean", torch.tensor(4.0))
    stats.add_ratio("ratio", torch.tensor(3.0), torch.tensor(4.0))
    stats.add_ratio("small", torch.tensor(0.1), torch.tensor(0.25))  # a denominator below 1 divides as it is
    stats.add_ratio("none", torch.tensor(0.0), torch.tensor(0.0))  # nothing counted: NaN as a token mean gives
    read = stats.read("cpu")
    assert math.isnan(read["empty"]) and read["mean"] == 3.0 and read["ratio"] == 0.75
    assert math.isclose(read["small"], 0.4, rel_tol=1e-6) and math.isnan(read["none"])
    assert "empty" in stats
