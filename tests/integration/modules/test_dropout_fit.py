"""A policy loaded with dropout: the update scores tokens as the rollout sampled them (unless dropout is kept)."""

import torch
from helpers import MetricRecorder, high_ids, make_trainer

from lightning_rl import GRPO, SamplingConfig, load_policy


def _first_step_kl(path: str, make_data, **kwargs) -> float:
    recorder = MetricRecorder(("train/kl_step",))
    module = GRPO(reward_funcs=[high_ids], model=path, num_generations=4, beta=0.1, learning_rate=3e-3,
                  sampling=SamplingConfig(max_new_tokens=5), logprob_backend="reference", **kwargs)
    make_trainer(max_steps=1, callbacks=[recorder]).fit(module, make_data(batch_size=2))
    return recorder.values["train/kl_step"][0]


def test_the_first_update_of_a_policy_with_dropout_has_no_kl_to_its_reference(tmp_path, make_data):
    torch.manual_seed(0)
    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1, "attention_dropout": 0.3})
    net.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # before the first optimizer step the policy is its reference: only dropout can make them differ
    assert _first_step_kl(str(tmp_path / "m"), make_data) == 0.0
    assert _first_step_kl(str(tmp_path / "m"), make_data, disable_dropout=False) > 1e-5
