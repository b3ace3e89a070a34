"""Validation and evaluate() sample without moving the training's random states."""

import torch
from helpers import make_trainer

from lightning_rl import SamplingConfig


def _weights_after(make_grpo, make_data, prompt_rows, validate: bool) -> dict[str, torch.Tensor]:
    module = make_grpo(seed=5, num_generations=2, sampling=SamplingConfig(max_new_tokens=4),
                       val_sampling=SamplingConfig(max_new_tokens=4, temperature=1.0))
    data = make_data(batch_size=2, val_data=prompt_rows[:2])
    if validate:
        module.evaluate(prompt_rows[:3])  # before the fit, as the demo does
    trainer = make_trainer(max_steps=4, val_check_interval=2 if validate else 1.0, limit_val_batches=1 if validate
                           else 0, check_val_every_n_epoch=None if validate else 1)
    trainer.fit(module, data)
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def test_sampled_validation_leaves_the_training_samples_as_they_were(make_grpo, make_data, prompt_rows):
    plain = _weights_after(make_grpo, make_data, prompt_rows, validate=False)
    validated = _weights_after(make_grpo, make_data, prompt_rows, validate=True)
    assert plain.keys() == validated.keys()
    assert all(torch.equal(plain[n], validated[n]) for n in plain)


def test_evaluate_names_empty_rows_and_a_missing_prompt_column(make_grpo):
    import pytest

    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="got no rows"):
        module.evaluate([])
    with pytest.raises(ValueError, match=r"row 1 has no 'prompt' column \(its keys: \['question'\]\)"):
        module.evaluate([{"prompt": "a"}, {"question": "b"}])
    out = module.evaluate([{"question": "ab"}, {"question": "cd"}], prompt_column="question")
    assert len(out["completions"]) == 2
