"""Step sizes without a fit: an explicit micro_batch_size wins, each module's training shape, a planned micro-batch.

The fits that show micro-batches following the plan are in tests/integration/modules.
"""

import pytest
from helpers import TINY, high_ids, tiny_grpo

from lightning_rl import DPO, KTO, ORPO, PPO


def test_explicit_micro_batch_size_wins():
    module = tiny_grpo("tiny-llama", model_config=TINY, micro_batch_size=3)
    assert module.micro_batch_for(8, 100) == 3
    module.micro_batch_size, module.micro_batch_tokens = None, 250
    assert module.micro_batch_for(8, 100) == 2
    module.micro_batch_tokens = None
    assert module.micro_batch_for(8, 100) == 8


@pytest.mark.parametrize(("sequences", "fit", "micro"), [(128, 94, 64), (8, 3, 3), (9, 2, 2), (10, 4, 4), (7, 7, 7),
                                                          (12, 5, 4), (3, 100, 3), (0, 2, 1)])
def test_a_token_budget_splits_into_the_fewest_even_micro_batches(sequences, fit, micro):
    module = tiny_grpo("tiny-llama", model_config=TINY)
    module.micro_batch_tokens = fit * 50 + 49  # fit whole 50-token sequences
    assert module.micro_batch_for(sequences, 50) == micro
    passes = -(-sequences // micro)
    assert micro <= fit and passes == -(-sequences // fit)  # no more passes than the budget needs


def test_only_adapter_training_limits_the_automatic_micro_batch():
    from lightning_rl.plugins.memory_plan import ADAPTER_MICRO_BATCH_TOKENS

    full = tiny_grpo("tiny-llama", model_config=TINY)
    full.configure_model()
    assert full.micro_batch_token_limit() is None and full.training_shape().max_micro_batch_tokens is None
    lora = tiny_grpo("tiny-llama", model_config=TINY, lora={"r": 4})
    lora.configure_model()
    assert lora.micro_batch_token_limit() == ADAPTER_MICRO_BATCH_TOKENS == 16384
    assert lora.training_shape().max_micro_batch_tokens == ADAPTER_MICRO_BATCH_TOKENS


@pytest.mark.parametrize(
    ("build", "sequence", "generates", "generations", "micro"),
    [
        (lambda: tiny_grpo("tiny-llama", model_config=TINY, micro_batch_size=3), 16 + 4, True, 2, 3),
        (lambda: PPO(reward_funcs=[high_ids], model="tiny-llama", model_config=TINY, max_prompt_length=16,
                     sampling={"max_new_tokens": 4}, num_generations=3), 16 + 4, True, 3, None),
        # preference pairs: chosen and rejected share a micro-batch; responses are cut at max_completion_length
        (lambda: DPO(model="tiny-llama", model_config=TINY, max_prompt_length=16, max_completion_length=24,
                     micro_batch_size=5), 16 + 24, False, 1, 10),
        # online DPO samples two completions per prompt of up to sampling.max_new_tokens
        (lambda: DPO(model="tiny-llama", model_config=TINY, max_prompt_length=16, online=True,
                     reward_funcs=[high_ids], sampling={"max_new_tokens": 6}, micro_batch_size=2), 16 + 6, True, 2, 4),
        (lambda: ORPO(model="tiny-llama", model_config=TINY, max_prompt_length=16, max_completion_length=None,
                      micro_batch_size=1), 16 + 1024, False, 1, 2),
        (lambda: KTO(model="tiny-llama", model_config=TINY, max_prompt_length=16, max_completion_length=8,
                     micro_batch_size=4), 16 + 8, False, 1, 4),
    ],
    ids=["grpo", "ppo", "dpo", "dpo-online", "orpo", "kto"],
)
def test_training_shape_of_each_module(build, sequence, generates, generations, micro):
    module = build()
    module.configure_model()
    shape = module.training_shape()
    assert (shape.sequence_tokens, shape.generates, shape.num_generations, shape.micro_batch_size) == \
        (sequence, generates, generations, micro)
    assert shape.model_config is module.policy.config


def test_a_planned_micro_batch_counts_the_pairs_sequences():
    dpo = DPO(model="tiny-llama", model_config=TINY, max_prompt_length=16, max_completion_length=24, micro_batch_size=8)
    dpo.configure_model()
    dpo.apply_micro_batch_plan(5 * (16 + 24))  # five sequences fit: two whole pairs
    assert dpo.micro_batch_size == 2
