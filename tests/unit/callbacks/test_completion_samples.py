"""When CompletionSamples writes a table: at the first step of a fresh fit, then at each multiple of every_n_steps."""

from types import SimpleNamespace

from lightning_rl.callbacks import CompletionSamples


def test_a_resumed_fit_writes_its_next_table_at_the_next_multiple_not_at_its_first_step():
    """Resumed at step 15 with every_n_steps=10: before, the first step after the resume (16) wrote a table."""
    resumed = CompletionSamples(every_n_steps=10)
    resumed.on_train_start(SimpleNamespace(global_step=15), None)
    assert not any(resumed._due(s) for s in range(16, 20)) and resumed._due(20)
    fresh = CompletionSamples(every_n_steps=10)
    fresh.on_train_start(SimpleNamespace(global_step=0), None)
    assert fresh._due(1)  # a fresh fit: its first step's samples
