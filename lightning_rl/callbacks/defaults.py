"""The callbacks the RL modules add to a run unless the Trainer already has their kind."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

from lightning_rl.callbacks.completions import CompletionSamples
from lightning_rl.callbacks.gc_pauses import FreezeLongLivedObjects
from lightning_rl.callbacks.progress import RLProgressBar
from lightning_rl.callbacks.report import RunReport


def _is_untouched_default(bar: Callback) -> bool:
    """Whether ``bar`` is a ``RichProgressBar`` with Lightning's default settings (the one the Trainer adds)."""
    default = RichProgressBar()
    return (type(bar) is RichProgressBar and bar.refresh_rate == default.refresh_rate
            and bar._leave == default._leave and bar.theme == RichProgressBarTheme() and not bar._console_kwargs)


def default_callbacks(trainer: L.Trainer) -> list[Callback]:
    """A :class:`CompletionSamples`, a :class:`RunReport` and a :class:`FreezeLongLivedObjects`, each unless
    ``trainer`` has one of its kind.

    Also puts an :class:`RLProgressBar` in place of the Trainer's default progress bar (one with
    Lightning's default settings); a progress bar configured by the user stays.
    """
    for i, cb in enumerate(trainer.callbacks):
        if _is_untouched_default(cb):
            trainer.callbacks[i] = RLProgressBar()
    added: list[Callback] = []
    if not any(isinstance(cb, CompletionSamples) for cb in trainer.callbacks):
        added.append(CompletionSamples())
    if not any(isinstance(cb, RunReport) for cb in trainer.callbacks):
        added.append(RunReport())
    if not any(isinstance(cb, FreezeLongLivedObjects) for cb in trainer.callbacks):
        added.append(FreezeLongLivedObjects())
    return added
