"""Two CPU processes (gloo) gather FSDP-sharded weights and a tensor-parallel group's prompts; exit 0 when right.

Run by tests/unit/rollout/test_sharded_weights.py as a script (``python sharded_runs.py PORT CASE...``): every
rank checks what it gathered against the unsharded model it started from, and a failing rank fails the run.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.rollout.policy_weights import adapter_tensors, base_weights, full_weights, merged_lora_weights
from lightning_rl.rollout.sharded_weights import full_numel, is_sharded

WORLD = 2


class Holder(nn.Module):
    """A LightningModule-like holder: the policy beside a frozen reference model, as GRPO holds them."""

    def __init__(self, policy: nn.Module, reference: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.reference = reference


def _models(lora: bool) -> tuple[Holder, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    policy, _ = load_policy("tiny-llama")
    reference, _ = load_policy("tiny-llama")
    if lora:
        policy = apply_lora(policy, {"r": 4, "lora_alpha": 8})
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.data.normal_()  # a trained adapter: B is no longer zero
        want = {k: v.clone() for k, v in base_weights(policy)}
        adapter = {k: v.clone() for k, v in adapter_tensors(policy)[0].items()}
    else:
        want, adapter = {k: v.clone() for k, v in full_weights(policy)}, {}
    return Holder(policy, reference), want, adapter


def _shard(holder: Holder, kind: str) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(holder, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                        device_id=torch.device("cpu"), use_orig_params=kind.endswith("orig"))
    from torch.distributed.fsdp import fully_shard

    for m in list(holder.modules()):
        if isinstance(m, LlamaDecoderLayer):
            fully_shard(m)
    fully_shard(holder)
    return holder


@contextlib.contextmanager
def _counted_unshards(opened: list[int]):
    """Count FSDP1 ``summon_full_params`` calls, and the most units unsharded at once, into ``opened``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    original = FSDP.summon_full_params
    live = [0]

    @contextlib.contextmanager
    def counted(module, *args, **kwargs):
        with original(module, *args, **kwargs):
            live[0] += 1
            opened.append(live[0])
            try:
                yield
            finally:
                live[0] -= 1

    FSDP.summon_full_params = staticmethod(counted)
    try:
        yield
    finally:
        FSDP.summon_full_params = original


def _check_weights(kind: str, lora: bool) -> None:
    holder, want, adapter = _models(lora)
    numel = sum(p.numel() for p in holder.policy.parameters())
    root = _shard(holder, kind)
    policy = holder.policy
    assert is_sharded(policy, root), kind
    assert full_numel(policy, root) == numel, (full_numel(policy, root), numel)  # the engine's size, not a shard's
    opened: list[int] = []
    with _counted_unshards(opened):
        source = base_weights(policy, root) if lora else full_weights(policy, root)
        got = {k: v.clone() for k, v in source}  # each tensor is valid until the iterator moves on
    if kind.startswith("fsdp1"):  # the root unit and the policy's 2 layers, one at a time; never the reference's
        assert len(opened) == 3 and max(opened) == 1, opened
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
    if lora:
        tensors, _ = adapter_tensors(policy, root)
        assert sorted(tensors) == sorted(adapter) and all(torch.equal(tensors[k], adapter[k]) for k in adapter)
        try:
            next(merged_lora_weights(policy, root))
        except NotImplementedError as err:
            assert "lora_sync='adapter'" in str(err)
        else:
            raise AssertionError("merged weights from shards should be refused")


def _check_prompts() -> None:
    from lightning_rl.rollout.engine_ranks import EngineRanks, new_tp_group
    from lightning_rl.rollout.tensor_parallel import gather_group_prompts, own_rows

    ranks = EngineRanks.current(tensor_parallel_size=2)
    assert ranks.external_launcher and ranks.rank_in_group == dist.get_rank()
    group = new_tp_group(ranks)  # the engine's group: ranks 0 and 1
    mine = [[ranks.rank, 1], [ranks.rank, 2, 3]] if ranks.rank == 0 else [[ranks.rank, 9]]
    prompts, counts = gather_group_prompts(mine, group)
    assert prompts == [[0, 1], [0, 2, 3], [1, 9]] and counts == [2, 1], (prompts, counts)
    assert own_rows(counts, ranks.rank_in_group, 4) == (slice(0, 8) if ranks.rank == 0 else slice(8, 12))


def _run(rank: int, port: int, cases: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for case in cases:
            try:
                if case == "prompts":
                    _check_prompts()
                else:
                    kind, _, lora = case.partition("+")
                    _check_weights(kind, lora == "lora")
            except Exception as err:
                raise AssertionError(f"case {case!r} failed on rank {rank}: {err!r}") from err
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(int(sys.argv[1]), sys.argv[2:]), nprocs=WORLD)
