"""A rollout is refused unless its prompts are left-padded and its completions right-padded."""

import pytest
import torch
from helpers import make_trainer

from lightning_rl import SamplingConfig
from lightning_rl.modules.rollout_layout import attach_host_lengths, check_rollout_layout, rows_host_lengths
from lightning_rl.rollout.engine import Rollout
from lightning_rl.rollout.padding import left_pad


def _rollout(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> Rollout:
    n = prompt_mask.shape[0]
    return Rollout(prompt_mask * 5, prompt_mask, completion_mask * 7, completion_mask,
                   torch.zeros(completion_mask.shape), ["stop"] * n, torch.zeros(n, dtype=torch.long))


def test_the_layout_the_engines_make_passes():
    ids, mask = left_pad([[1, 2, 3], [4], []], 0)
    check_rollout_layout(_rollout(mask, torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])))
    check_rollout_layout(_rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)))


def test_the_check_gives_each_rows_lengths_in_host_memory_and_a_rollout_keeps_them_for_its_rows():
    ids, mask = left_pad([[1, 2, 3], [4], [5, 6]], 0)
    rollout = _rollout(mask, torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    prompt_len, completion_len = check_rollout_layout(rollout)
    assert prompt_len.tolist() == [3, 1, 2] and completion_len.tolist() == [2, 1, 0]
    assert prompt_len.device.type == "cpu" and rows_host_lengths(rollout, slice(0, 2)) is None  # none kept yet
    attach_host_lengths(rollout, (prompt_len, completion_len))
    assert [t.tolist() for t in rows_host_lengths(rollout, slice(1, 3))] == [[1, 2], [1, 0]]
    assert [t.tolist() for t in rows_host_lengths(rollout, torch.tensor([2, 0]))] == [[2, 3], [0, 2]]
    assert rows_host_lengths(rollout, torch.tensor([2, 0], device="meta")) is None  # device indices: not read back
    assert rows_host_lengths(rollout.to("cpu"), slice(0, 1)) is None  # a copy keeps none


def test_a_right_padded_prompt_is_refused_with_its_row():
    prompts = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"prompts in rows \[1\] are not left-padded"):
        check_rollout_layout(_rollout(prompts, torch.ones(2, 2, dtype=torch.long)))


def test_a_completion_with_a_hole_is_refused_with_its_row():
    completions = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match=r"completions in rows \[2\] are not right-padded"):
        check_rollout_layout(_rollout(torch.ones(3, 2, dtype=torch.long), completions))


def test_a_fit_refuses_a_right_padded_rollout_a_callback_attached(make_grpo, make_data):
    import lightning as L

    class RightPadded(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            r = pl_module.generate_rollout(batch["prompt"])
            order = torch.argsort(r.prompt_mask, dim=1, descending=True, stable=True)  # real tokens first
            batch["rollout"] = Rollout(r.prompt_ids.gather(1, order), r.prompt_mask.gather(1, order),
                                       r.completion_ids, r.completion_mask, r.sampling_logprobs, r.finish_reasons,
                                       r.group_index)

    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3))
    rows = [{"prompt": "a"}, {"prompt": "a much longer prompt"}]
    with pytest.raises(ValueError, match="not left-padded"):
        make_trainer(max_steps=1, callbacks=[RightPadded()]).fit(module, make_data(batch_size=2, rows=rows))
