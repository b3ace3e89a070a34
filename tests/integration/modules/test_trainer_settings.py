"""Trainer settings of automatic optimization are refused with what to use instead; a max_steps overshoot is told."""

import logging

import pytest
from helpers import make_trainer

from lightning_rl import SamplingConfig


@pytest.mark.parametrize(("setting", "fix"), [({"accumulate_grad_batches": 2}, "raise the data module's batch_size"),
                                              ({"gradient_clip_val": 0.5}, "pass max_grad_norm=0.5 to the module")])
def test_automatic_optimization_settings_are_refused_with_the_modules_own(make_grpo, make_data, setting, fix):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match=fix):
        make_trainer(max_steps=1, **setting).fit(module, make_data(batch_size=2))


def test_validate_runs_with_them(make_grpo, make_data, prompt_rows):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3))
    make_trainer(gradient_clip_val=0.5).validate(module, make_data(batch_size=2, val_data=prompt_rows[:2]))


def test_max_steps_between_batches_warns_where_the_run_stops(make_grpo, make_data, caplog):
    caplog.set_level(logging.WARNING, logger="lightning_rl.modules.policy")
    module = make_grpo(num_generations=2, num_iterations=2, num_mini_batches=2, micro_batch_size=2,
                       sampling=SamplingConfig(max_new_tokens=3))
    trainer = make_trainer(max_steps=6)
    trainer.fit(module, make_data(batch_size=2))
    assert trainer.global_step == 8
    assert any("max_steps=6 is not a multiple of the 4 optimizer steps" in r.getMessage()
               and "stops at step 8" in r.getMessage() for r in caplog.records)
