"""Where each process's engine sits: tensor-parallel groups, early errors, and what vLLM is told."""

import pytest
import torch

from lightning_rl.models import load_policy
from lightning_rl.rollout import EngineSettings
from lightning_rl.rollout import vllm as vllm_mod
from lightning_rl.rollout.engine_ranks import EngineRanks, check_tensor_parallel, new_tp_group, tp_groups


def test_groups_are_consecutive_ranks():
    assert tp_groups(4, 2) == [[0, 1], [2, 3]]
    assert tp_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tp_groups(3, 1) == [[0], [1], [2]]
    assert tp_groups(2, 2) == [[0, 1]]


@pytest.mark.parametrize(
    ("tp", "world", "distributed", "match"),
    [
        (2, 3, True, r"must divide the number of processes \(3\)"),
        (4, 6, True, "multiple of 4"),
        (2, 1, False, "torch.distributed is not initialised.*strategy='ddp'"),
        (0, 1, False, "must be >= 1"),
    ],
)
def test_impossible_tensor_parallel_sizes_are_refused_with_the_fix(tp, world, distributed, match):
    with pytest.raises(ValueError, match=match):
        check_tensor_parallel(tp, world, distributed)


def test_one_process_per_engine_needs_nothing():
    check_tensor_parallel(1, 1, False)
    check_tensor_parallel(1, 3, True)
    check_tensor_parallel(2, 4, True)


def test_ranks_of_a_process_in_a_tensor_parallel_group():
    r = EngineRanks(rank=3, world_size=4, device_index=1, tensor_parallel_size=2, distributed=True)
    assert (r.group_index, r.rank_in_group) == (1, 1)
    assert r.launcher_env() == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}  # LOCAL_RANK: the GPU used
    assert r.llm_kwargs() == {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 2}
    with pytest.raises(ValueError, match="outside the world"):
        EngineRanks(rank=4, world_size=4, tensor_parallel_size=2, distributed=True)


def test_a_lone_process_keeps_vllms_one_gpu_executor():
    r = EngineRanks.current()
    assert not torch.distributed.is_initialized()
    assert (r.rank, r.world_size, r.distributed, r.external_launcher) == (0, 1, False, False)
    assert r.llm_kwargs() == {}
    assert new_tp_group(r) is None  # no group to make: the engine generates alone


def test_one_rank_under_ddp_still_uses_the_external_launcher():
    r = EngineRanks(rank=0, world_size=1, distributed=True)
    assert r.llm_kwargs()["distributed_executor_backend"] == "external_launcher"
    assert r.llm_kwargs()["tensor_parallel_size"] == 1


def test_the_engine_refuses_tensor_parallelism_in_a_lone_process_before_vllm(vllm_and_cuda_pretended, monkeypatch):
    monkeypatch.setattr(vllm_mod.torch.cuda, "current_device", lambda: 0)
    model, tok = load_policy("tiny-llama")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 shards the engine over 2 processes"):
        vllm_mod.VLLMEngine(model, [tok.eos_token_id], tok.pad_token_id, 64,
                            settings=EngineSettings(tensor_parallel_size=2))


def test_tensor_parallel_size_is_a_validated_setting():
    assert EngineSettings().tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineSettings(tensor_parallel_size=0)
