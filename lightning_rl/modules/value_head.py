"""The PPO value head: a Linear on a causal LM's final hidden states, plus the one-forward helpers.

On the shared backbone (the default), one forward of the policy gives both the token log-probs
(through the fused log-prob path, no full logits) and the values; with LoRA the adapters and the
value head train while the base stays frozen. A separate critic model uses the same helpers on
its own backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_rl.logprobs import backbone_and_head, completion_hidden_states, logprobs_from_hidden, unwrap


def check_hidden_state_access(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone and LM head of ``model``, or a clear error when its hidden states are out of reach."""
    try:
        return backbone_and_head(model)
    except TypeError as err:
        raise TypeError(
            f"a value head reads the final hidden states of the model's backbone, which "
            f"{type(unwrap(model)).__name__} does not expose ({err}). Use a transformers *ForCausalLM model "
            "(it has base_model_prefix and get_output_embeddings()), or give PPO a separate critic_model that does."
        ) from err


def hidden_size_of(model: nn.Module) -> int:
    """Width of ``model``'s final hidden states (from its config, else its LM head)."""
    _, head = check_hidden_state_access(model)
    size = getattr(getattr(unwrap(model), "config", None), "hidden_size", None)
    return int(size) if size else int(head.weight.shape[1])


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on final hidden states; zero-initialised, so values start at 0.

    A zero head also sends no gradient into a shared backbone until it has learned something,
    so the first updates of the policy are not disturbed by a random critic.

    Args:
        hidden_size: width of the hidden states.
        dropout: dropout on the hidden states before the Linear.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states -> ``[...]`` float32 values."""
        h = self.dropout(hidden.to(self.summary.weight.dtype))
        return self.summary(h).squeeze(-1).float()


__all__ = [
    "ValueHead",
    "check_hidden_state_access",
    "completion_hidden_states",
    "hidden_size_of",
    "logprobs_from_hidden",
]
