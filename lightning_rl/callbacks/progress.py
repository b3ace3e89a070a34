"""A progress bar for RL runs: optimizer steps towards ``max_steps`` and a few step values (loss, reward, KL)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from typing_extensions import override

# label in the bar -> logged metric name (shown when the module logs it: train/<name>_step, or val/<name>)
DEFAULT_KEYS: dict[str, str] = {
    "loss": "train/loss",
    "reward": "train/reward",
    "kl": "train/kl",
    "tok/s": "train/tokens_per_sec",
    "acc": "train/rewards/accuracy",
    "margin": "train/rewards/margins",
    "val reward": "val/reward",
}


class RLProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, counting optimizer steps when ``max_steps`` is set.

    The bar reads ``Step 12/24`` (``trainer.global_step`` of ``trainer.max_steps``) instead of
    ``Epoch 0/-2``, and shows the last step's value of each metric in ``keys`` that the module
    logs (by default loss, reward, KL, generated tokens/s, preference accuracy and margin, and the
    validation reward), under short labels. Without ``max_steps`` it counts batches per epoch, as
    Lightning's does. The RL modules put one in place of the Trainer's default progress bar; a
    progress bar passed in ``callbacks`` is left alone.

    Args:
        keys: label -> logged metric name (``train/<name>`` reads its ``_step`` value).
        refresh_rate: redraws per second.
        leave: keep the finished bar of each epoch on the screen.
        theme: Rich styles (Lightning's default theme when None).
        console_kwargs: arguments of the Rich console.
    """

    def __init__(
        self,
        keys: Mapping[str, str] | None = None,
        refresh_rate: int = 10,
        leave: bool = False,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme or RichProgressBarTheme(),
                         console_kwargs=console_kwargs)
        self.keys = dict(DEFAULT_KEYS if keys is None else keys)

    def _counts_steps(self) -> bool:
        return self._trainer is not None and self.trainer.max_steps > 0

    @property
    @override
    def total_train_batches(self) -> int | float:
        """``max_steps`` when set (the bar counts optimizer steps), else the epoch's batches."""
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if self._counts_steps():
            return f"{'Step':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start (or reset) the bar; when counting steps, at the current step rather than at 0."""
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Advance to ``global_step`` (counting steps) or to the batch (counting batches), then update the values."""
        if not self._counts_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The values of ``keys`` that were logged (step values for ``train/`` metrics)."""
        metrics = trainer.callback_metrics
        out = {}
        for label, name in self.keys.items():
            key = f"{name}_step" if name.startswith("train/") else name
            value = metrics.get(key, metrics.get(name))
            if value is not None:
                out[label] = float(value)
        return out
