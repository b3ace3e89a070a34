"""Sample completions in the logger every few steps, and a table of the last ones in the console at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typing_extensions import override

from lightning_rl.callbacks.logger_tables import append_csv, cell_text, log_table
from lightning_rl.samples import StepSamples

log = logging.getLogger(__name__)


class CompletionSamples(Callback):
    """Log a table of sampled completions and their scores every ``every_n_steps`` steps and at the end of fit.

    Each row is one completion (GRPO, PPO: prompt, completion, total reward, reward per function,
    advantage) or one pair / labelled row (DPO, ORPO: chosen and rejected with their implicit
    rewards; KTO: completion, label, implicit reward), for the first ``num_groups`` prompts of the
    step. The module provides the rows (``pl_module.last_samples``, a
    :class:`~lightning_rl.samples.StepSamples`); the table goes through each logger's own API (see
    :func:`~lightning_rl.callbacks.logger_tables.log_table`): ``completions.csv`` next to a
    ``CSVLogger``'s ``metrics.csv``, a TensorBoard text table, a ``wandb.Table``, an MLflow artifact.
    At the end of fit the last rows are also printed in the console as a Rich table.

    The RL modules add one with the defaults unless the Trainer already has one: pass your own to
    change them (``every_n_steps=0`` writes only at the end; ``console=False`` prints nothing).

    Args:
        every_n_steps: write every this many optimizer steps (``trainer.global_step``); 0 only at the end.
        num_groups: prompts (with all their completions) or pairs per table.
        key: the table's name (CSV file stem, TensorBoard tag, W&B key, MLflow artifact folder).
        max_chars: cut cells of the console table to this many characters.
        console: print the last table at the end of fit.
        console_rows: at most this many rows in the console.
        dirpath: also append every table to ``<dirpath>/<key>.csv`` (e.g. when the Trainer has no logger).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        num_groups: int = 2,
        key: str = "completions",
        max_chars: int = 200,
        console: bool = True,
        console_rows: int = 8,
        dirpath: str | Path | None = None,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end of fit), got {every_n_steps}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1 (prompts whose completions are shown), got {num_groups}")
        self.every_n_steps = every_n_steps
        self.num_groups = num_groups
        self.key = key
        self.max_chars = max_chars
        self.console = console
        self.console_rows = console_rows
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._seen: StepSamples | None = None
        self._latest: tuple[int, StepSamples] | None = None
        self._written_step = -1
        self.destinations: list[str] = []

    def _due(self, step: int) -> bool:
        n = self.every_n_steps
        return n > 0 and self._written_step // n < step // n

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """In a resumed fit, count the restored step as written.

        The next table then comes at the next multiple of ``every_n_steps``, not at the first step after the resume.
        """
        if trainer.global_step > 0 and self._written_step < trainer.global_step:  # a fresh fit writes at step 1
            self._written_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Keep the step's samples; write them when the step count passes a multiple of ``every_n_steps``."""
        samples = getattr(pl_module, "last_samples", None)
        if samples is None or samples is self._seen:
            return
        self._seen = samples
        self._latest = (trainer.global_step, samples)
        if self._due(trainer.global_step):
            self.write(trainer, *self._latest)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the last step's samples (unless already written) and print them."""
        if self._latest is None:
            return
        step, samples = self._latest
        if self._written_step != step:
            self.write(trainer, step, samples)
        if self.console and trainer.is_global_zero:
            self.print_table(samples.head(self.num_groups)[: self.console_rows], step, type(pl_module).__name__)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Write the last step's samples (unless already written) when the run fails: they may show why."""
        if self._latest is None or self._written_step == self._latest[0]:
            return
        try:
            self.write(trainer, *self._latest)
        except Exception as err:  # noqa: BLE001 - the run's exception is the one to raise
            log.warning("CompletionSamples: the last samples of the failed run were not written: %s", err)

    @rank_zero_only
    def write(self, trainer: L.Trainer, step: int, samples: StepSamples) -> None:
        """Send the first ``num_groups`` groups of ``samples`` to every logger (and ``dirpath``)."""
        self._written_step = step
        rows = samples.head(self.num_groups)
        if not rows:
            return
        if self.dirpath is not None:
            append_csv(self.dirpath / f"{self.key}.csv", rows, step)
        for logger in trainer.loggers:
            where = log_table(logger, self.key, rows, step)
            if where is None:
                log.debug("%s cannot take a table; sample completions not logged to it", type(logger).__name__)
            elif where not in self.destinations:
                self.destinations.append(where)

    def print_table(self, rows: list[dict[str, Any]], step: int, title: str) -> None:
        """Print ``rows`` as a Rich table."""
        if not rows:
            return
        table = Table(title=f"{title}: sample completions at step {step}", show_lines=True)
        for c in rows[0]:
            numeric = isinstance(rows[0][c], (int, float)) and not isinstance(rows[0][c], bool)
            table.add_column(c, justify="right" if numeric else "left", overflow="fold")
        for r in rows:
            table.add_row(*(Text(cell_text(v, self.max_chars)) for v in r.values()))  # as written: no markup
        Console().print(table)
