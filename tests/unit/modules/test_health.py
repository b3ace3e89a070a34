"""The collapse warning needs both signs: low entropy and short completions."""

import math

from lightning_rl.modules.health import collapse_message


def test_collapse_message_needs_both_signs():
    assert collapse_message(0.01, 1.0) and "lower learning_rate" in collapse_message(0.01, 1.0)
    assert collapse_message(0.01, 12.0) is None  # confident but still writing
    assert collapse_message(2.0, 1.0) is None  # short answers from a policy that still explores
    assert collapse_message(None, 1.0) is None and collapse_message(math.nan, 1.0) is None
