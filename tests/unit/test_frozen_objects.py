"""objects_frozen: the objects alive at entry are out of the collector's walks inside, and back after."""

import gc

import pytest

from lightning_rl.frozen_objects import objects_frozen


def test_objects_are_frozen_inside_and_given_back_after_even_on_error():
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="engine died"), objects_frozen():
        assert gc.get_freeze_count() > 1000
        raise RuntimeError("engine died")
    assert gc.get_freeze_count() == 0
