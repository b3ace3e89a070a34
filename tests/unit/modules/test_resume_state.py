"""Which random states a resumed process takes from a checkpoint's resume state."""

import random

import torch

from lightning_rl.modules.resume_state import (
    rng_states,
    rng_states_for,
    rng_states_of_every_process,
    set_rng_states,
)


def _states(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    return rng_states()


def test_each_process_takes_its_own_state_when_the_run_has_as_many_processes():
    every = [_states(0), _states(1), _states(2)]
    saved = {"rng": every[0], "rng_per_process": every}
    for rank in range(3):
        assert rng_states_for(saved, rank, 3) is every[rank]


def test_another_count_of_processes_keeps_each_process_as_seeded_and_an_old_checkpoint_gives_the_first_state():
    every = [_states(0), _states(1)]
    assert rng_states_for({"rng": every[0], "rng_per_process": every}, 1, 4) is None
    assert rng_states_for({"rng": every[0]}, 1, 2) is every[0]  # written by one process, or before the change
    assert rng_states_for({}, 0, 1) is None


def test_one_process_gathers_nothing_and_a_state_put_back_draws_the_same_numbers():
    assert rng_states_of_every_process() is None  # no process group
    saved = _states(5)
    first = (torch.rand(3), random.random())
    torch.manual_seed(9)
    set_rng_states(saved)
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]
