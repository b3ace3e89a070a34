"""A step's logged token statistics are the same however the memory plan or the user splits it into micro-batches."""

import math

import pytest
from helpers import MetricRecorder, make_trainer

from lightning_rl import SamplingConfig

NAMES = ("train/entropy_step", "train/kl_step", "train/clip_ratio_step", "train/reward_step")


def _logged(make_grpo, make_data, micro_batch_size):
    recorder = MetricRecorder(NAMES)
    module = make_grpo(seed=3, num_generations=4, micro_batch_size=micro_batch_size, beta=0.1, num_iterations=2,
                       sampling=SamplingConfig(max_new_tokens=5), mask_truncated_completions=False)
    make_trainer(max_steps=1, callbacks=[recorder]).fit(module, make_data(batch_size=2))
    return {n: v[0] for n, v in recorder.values.items()}


def test_micro_batches_of_three_rows_log_the_token_means_of_one_batch(make_grpo, make_data):
    whole = _logged(make_grpo, make_data, 8)
    split = _logged(make_grpo, make_data, 3)  # 3 + 3 + 2 rows: a mean of micro-batch means would weigh the last more
    assert all(not math.isnan(v) for v in whole.values()) and whole["train/kl_step"] > 0  # the second pass moved
    for name in NAMES:
        assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name
