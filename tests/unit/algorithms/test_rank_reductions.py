"""Statistics that cross processes: batch-scaled advantages with a simulated two-process all-reduce."""

import torch

from lightning_rl.algorithms.advantages import group_advantages


def _sums(rewards: torch.Tensor) -> torch.Tensor:
    """What one process contributes to the all-reduce: count, sum and sum of squares of its rewards."""
    r = rewards.double()
    return torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), r.sum(), (r * r).sum()])


def test_batch_scaled_advantages_use_every_process_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])  # 4 groups of G=2
    whole = group_advantages(rewards, 2, "batch")
    halves = rewards[:4], rewards[4:]
    got = torch.cat([group_advantages(h, 2, "batch", reduce=lambda t, other=halves[1 - r]: t + _sums(other))
                     for r, h in enumerate(halves)])
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
    local = torch.cat([group_advantages(h, 2, "batch") for h in halves])
    assert not torch.allclose(local, whole)  # each process's own std would scale differently


def test_each_process_engine_samples_from_its_own_seed():
    from types import SimpleNamespace

    from lightning_rl import VLLMRollout
    from lightning_rl.callbacks.vllm_rollout import RANK_SEED_STRIDE
    from lightning_rl.rollout import EngineSettings

    seeds = []
    cb = VLLMRollout(settings=EngineSettings(seed=7), engine_factory=lambda m, n, seed: seeds.append(seed))
    for rank in (0, 1):
        cb.build_engine(SimpleNamespace(_trainer=SimpleNamespace(global_rank=rank)), 4)
    assert seeds == [7, 7 + RANK_SEED_STRIDE]


def test_the_shards_of_a_tensor_parallel_engine_share_their_groups_seed():
    from types import SimpleNamespace

    from lightning_rl import VLLMRollout
    from lightning_rl.callbacks.vllm_rollout import RANK_SEED_STRIDE
    from lightning_rl.rollout import EngineSettings

    seeds = []
    cb = VLLMRollout(settings=EngineSettings(seed=7, tensor_parallel_size=2),
                     engine_factory=lambda m, n, seed: seeds.append(seed))
    for rank in range(4):
        cb.build_engine(SimpleNamespace(_trainer=SimpleNamespace(global_rank=rank)), 4)
    assert seeds == [7, 7, 7 + RANK_SEED_STRIDE, 7 + RANK_SEED_STRIDE]  # ranks 0-1 and 2-3 sample alike
