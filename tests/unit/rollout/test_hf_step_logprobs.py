"""HFEngine reads the sampled tokens' log-probs one generate step at a time."""

import torch

from lightning_rl.rollout.hf import step_logits_logprobs


def test_step_by_step_logprobs_equal_the_stacked_ones_and_release_each_step():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 11, generator=g) for _ in range(5)]
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    want = torch.log_softmax(torch.stack(steps, 1) / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    held = list(steps)
    got = step_logits_logprobs(held, tokens, 0.7)
    torch.testing.assert_close(got, want)
    assert all(s is None for s in held)  # every step's logits let go once read
