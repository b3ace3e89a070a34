"""The collapse warning needs both signs: low entropy and short completions."""

import math

from lightning_rl.modules.health import collapse_message


def test_collapse_message_needs_both_signs():
    assert collapse_message(0.01, 1.0) and "lower learning_rate" in collapse_message(0.01, 1.0)
    assert collapse_message(0.01, 12.0) is None  # confident but still writing
    assert collapse_message(2.0, 1.0) is None  # short answers from a policy that still explores
    assert collapse_message(None, 1.0) is None and collapse_message(math.nan, 1.0) is None


def test_steps_that_train_nothing_are_warned_about_after_a_streak(caplog):
    """Every group's rewards equal (every GRPO advantage 0), or every completion truncated and masked out: one warning
    at the third step in a row (max_unscored_steps=3), none before it, none after a step that trains."""
    import logging

    from lightning_rl.modules.health import RunHealth

    health = RunHealth(max_unscored_steps=3)
    flat = {"frac_reward_zero_std": 1.0, "truncated_frac": 0.2}
    with caplog.at_level(logging.WARNING, logger="lightning_rl.modules.health"):
        for step in range(2):
            health.check_signal(flat, step)
        assert not caplog.records
        health.check_signal({"frac_reward_zero_std": 0.5, "truncated_frac": 0.2}, 2)  # a step that trains
        for step in range(3, 6):
            health.check_signal(flat, step)
    assert [r.getMessage()[:52] for r in caplog.records] == ["step 5: for 3 steps in a row every group of completi"]
    assert "denser reward" in caplog.records[0].getMessage()
    caplog.clear()
    masked = {"frac_reward_zero_std": 0.0, "truncated_frac": 1.0}
    with caplog.at_level(logging.WARNING, logger="lightning_rl.modules.health"):
        for step in range(3):
            health.check_signal(masked, step, masks_truncated=False)  # truncated, but still in the loss
        assert not caplog.records
        for step in range(3):
            health.check_signal(masked, step, masks_truncated=True)
    assert len(caplog.records) == 1 and "Raise sampling.max_new_tokens" in caplog.records[0].getMessage()
    assert health.state_dict()["masked_streak"] == 3
