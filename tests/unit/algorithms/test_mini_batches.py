"""Near-equal mini-batch shares of a rollout."""

import pytest

from lightning_rl.algorithms.mini_batches import check_mini_batches, mini_batch_bounds


@pytest.mark.parametrize(("n", "k"), [(8, 4), (6, 4), (7, 3), (5, 1), (3, 5), (1, 1), (130, 7)])
def test_bounds_cover_every_row_once_in_near_equal_shares(n, k):
    bounds = mini_batch_bounds(n, k)
    assert len(bounds) == min(n, k)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_equal_split_when_it_divides():
    assert mini_batch_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one completion"):
        mini_batch_bounds(0, 2)
    with pytest.raises(ValueError, match="num_mini_batches must be >= 1"):
        mini_batch_bounds(4, 0)


def test_a_batch_needs_a_completion_for_each_mini_batch():
    check_mini_batches(8, 4, 2)  # 8 completions, 8 mini-batches: fine
    with pytest.raises(ValueError, match=r"num_mini_batches=9 is more than the 8 completions .*4 prompts x num_gen"):
        check_mini_batches(9, 4, 2)
