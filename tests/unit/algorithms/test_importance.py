"""Truncated importance weights and the trainer/engine log-prob mismatch, by hand."""

import math

import pytest
import torch

from lightning_rl.algorithms.importance import importance_weights, mismatch_stats


def test_token_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0]])
    w = importance_weights(trainer, engine, mask, "token", cap=2.0)
    # exp(0.5) = 1.6487, exp(-1.0) = 0.3679, masked -> 0
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))
    w_cap = importance_weights(trainer, engine, mask, "token", cap=1.5)
    torch.testing.assert_close(w_cap, torch.tensor([[1.5, math.exp(-1.0), 0.0]]))


def test_sequence_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-1.2, -2.1, -9.0], [-3.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = importance_weights(trainer, engine, mask, "sequence", cap=3.0)
    # row 0: exp(0.2 + 0.1) = 1.3499 on its two tokens; row 1: exp(2.0) = 7.39 -> capped at 3
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.3), math.exp(0.3), 0.0], [3.0, 3.0, 3.0]]))
    assert importance_weights(trainer, engine, mask, "none").tolist() == mask.float().tolist()


def test_importance_weights_do_not_overflow_and_carry_no_gradient():
    trainer = torch.tensor([[500.0, 0.0]], requires_grad=True)
    w = importance_weights(trainer, torch.zeros(1, 2), torch.ones(1, 2), "sequence", cap=2.0)
    assert torch.isfinite(w).all() and w.tolist() == [[2.0, 2.0]] and not w.requires_grad
    with pytest.raises(ValueError, match="one of"):
        importance_weights(trainer, trainer, torch.ones(1, 2), "tokens")
    with pytest.raises(ValueError, match="> 0"):
        importance_weights(trainer, trainer, torch.ones(1, 2), "token", cap=0)


def test_mismatch_stats_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -9.0]])
    stats = mismatch_stats(trainer, engine, torch.tensor([[1, 1, 0]]))
    assert stats["logprob_mismatch_mean"] == pytest.approx(0.75)
    assert stats["logprob_mismatch_max"] == pytest.approx(1.0)
    assert mismatch_stats(trainer, engine, torch.zeros(1, 3))["logprob_mismatch_max"] == 0.0
