"""The PPO value head on the policy's shared backbone: the same log-probs, values of the right shape, clear refusals."""

import pytest
import torch
from torch import nn

from lightning_rl.logprobs import completion_logprobs
from lightning_rl.models import load_policy
from lightning_rl.modules.value_head import (
    ValueHead,
    check_hidden_state_access,
    completion_hidden_states,
    hidden_size_of,
    logprobs_from_hidden,
)


def _tiny_batch(tok):
    prompt_ids = torch.tensor([[tok.pad_token_id, 10, 11], [12, 13, 14]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[20, 21, tok.eos_token_id], [22, tok.pad_token_id, tok.pad_token_id]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_shared_backbone_gives_the_same_logprobs_and_values_of_the_right_shape():
    torch.manual_seed(0)
    model, tok = load_policy("tiny-llama")
    batch = _tiny_batch(tok)
    hidden = completion_hidden_states(model, *batch)
    assert hidden.shape == (2, 3, hidden_size_of(model)) and hidden_size_of(model) == 64
    logp, ent = logprobs_from_hidden(model, hidden, batch[2], batch[3], backend="reference")
    want_logp, want_ent = completion_logprobs(model, *batch, backend="reference")
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(ent, want_ent)
    head = ValueHead(64)
    values = head(hidden)
    assert values.shape == (2, 3) and values.dtype == torch.float32
    assert values.abs().sum() == 0  # zero-initialised: values start at 0


def test_value_head_refuses_a_model_without_hidden_state_access():
    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="value head reads the final hidden states.*critic_model"):
        check_hidden_state_access(Scorer())
    with pytest.raises(TypeError, match="value head"):
        hidden_size_of(Scorer())
