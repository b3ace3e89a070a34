"""A tensor-parallel group generates every member's prompts once; each member keeps the rows of its own."""

import pytest
import torch

from lightning_rl.rollout import Rollout
from lightning_rl.rollout.tensor_parallel import flatten_group, own_rows, take_rows


def _rollout(num_prompts, g):
    """A group rollout whose every token id says which prompt (and completion) the row answers."""
    n = num_prompts * g
    group = torch.arange(num_prompts).repeat_interleave(g)
    ids = (group * 100 + torch.arange(n) % g)[:, None].repeat(1, 3)
    return Rollout(prompt_ids=ids.clone(), prompt_mask=torch.ones(n, 3, dtype=torch.long), completion_ids=ids + 1,
                   completion_mask=torch.ones(n, 3, dtype=torch.long), sampling_logprobs=-ids.float(),
                   finish_reasons=[f"stop{i}" for i in range(n)], group_index=group, extras={"engine": "vllm"})


def test_the_group_prompts_are_the_members_in_rank_order():
    prompts, counts = flatten_group([[[1, 2], [3]], [[4]], [[5], [6], [7]]])
    assert prompts == [[1, 2], [3], [4], [5], [6], [7]] and counts == [2, 1, 3]


def test_each_member_gets_back_the_completions_of_its_own_prompts():
    counts, g = [2, 1, 3], 2  # three members with 2, 1 and 3 prompts
    group = _rollout(sum(counts), g)
    assert [own_rows(counts, m, g) for m in range(3)] == [slice(0, 4), slice(4, 6), slice(6, 12)]
    mine = take_rows(group, own_rows(counts, 2, g))
    assert mine.num_sequences == 6
    assert mine.prompt_ids[:, 0].tolist() == [300, 301, 400, 401, 500, 501]  # prompts 3, 4, 5 of the group
    assert mine.group_index.tolist() == [0, 0, 1, 1, 2, 2]  # renumbered: this member's prompts 0, 1, 2
    assert mine.finish_reasons == [f"stop{i}" for i in range(6, 12)]
    assert torch.equal(mine.sampling_logprobs, group.sampling_logprobs[6:12])
    assert mine.extras == {"engine": "vllm"}


def test_the_members_rows_cover_the_group_once():
    counts, g = [3, 3], 4
    group = _rollout(6, g)
    parts = [take_rows(group, own_rows(counts, m, g)) for m in range(2)]
    assert torch.equal(torch.cat([p.completion_ids for p in parts]), group.completion_ids)
    assert parts[0].group_index.tolist() == parts[1].group_index.tolist()  # same local layout on every member


def test_a_member_outside_the_group_is_an_error():
    with pytest.raises(ValueError, match="member 2 is not in a group of 2"):
        own_rows([1, 1], 2, 4)
