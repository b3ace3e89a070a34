"""Collect the step metrics of a run and write the report (figures + ``report.md``) at the end of fit."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_rl.hparams import portable
from lightning_rl.report import ReportInfo, write_report

log = logging.getLogger(__name__)

GiB = 1024**3


def step_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The values one training step logged: ``train/<name>_step`` as ``<name>``; ``memory/*``, ``rollout/*`` as is."""
    picked = {}
    for key, value in metrics.items():
        if key.startswith("train/") and key.endswith("_step"):
            picked[key[len("train/"):-len("_step")]] = value
        elif key.startswith(("memory/", "rollout/")):
            picked[key] = value
    return _floats(picked)


def _floats(values: dict[str, Any]) -> dict[str, float]:
    """Tensors to floats with one device sync (not one per metric)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    out = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().float().reshape(()).to(device) for v in tensors.values()])
        out.update(zip(tensors, stacked.cpu().tolist()))
    return out


def _stop_note(stopped_by: BaseException | None) -> list[str]:
    """The report's note on how a run that ended early stopped (none for a run that finished)."""
    if stopped_by is None:
        return []
    if isinstance(stopped_by, KeyboardInterrupt):
        return ["The run was interrupted (KeyboardInterrupt) before it finished: these are the steps it made."]
    text = " ".join(str(stopped_by).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return [f"The run stopped early with {type(stopped_by).__name__}: {text}"]


def _link(destination: str, root: Path) -> str:
    """A markdown link for a file inside ``root`` (relative), else the destination as it is."""
    path = Path(destination).resolve()
    if path.is_file() and path.is_relative_to(root.resolve()):
        rel = path.relative_to(root.resolve()).as_posix()
        return f"[{rel}]({rel})"
    return destination


class RunReport(Callback):
    """Write a report of the run into its log directory at the end of fit.

    Every training batch it keeps the step values the module logged (``train/*``, plus the memory
    figures of :class:`~lightning_rl.plugins.MemoryAwarePrecision` and the timings of
    :class:`~lightning_rl.callbacks.VLLMRollout`), the batch's wall time and the device's peak memory
    (host RSS on a CPU); at each validation, the ``val/*`` values. At the end of fit it writes
    ``report.md`` and ``figures/*.png`` (reward mean and per function, KL, entropy, completion
    length, clip ratio, loss, step time split into rollout / training, memory per phase) into
    ``trainer.log_dir``, or into ``dirpath``. The history is kept in checkpoints, so a resumed run
    reports all its steps. With no logger and no ``dirpath`` nothing is written.

    The RL modules add one unless the Trainer already has one.

    Args:
        dirpath: where to write (default: the run's log directory, when the Trainer has a logger).
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []
        self.report_path: Path | None = None
        self._t0 = 0.0

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Start the batch's clock (and, on CUDA, its peak-memory count)."""
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Keep the step's values, wall time and peak memory."""
        row = step_values(trainer.callback_metrics)
        row["step_time_s"] = time.perf_counter() - self._t0
        if pl_module.device.type == "cuda":
            row["memory/step_peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / GiB
        else:
            row["memory/host_rss_gib"] = psutil.Process().memory_info().rss / GiB
        row["step"] = float(trainer.global_step)
        self.history.append(row)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the validation values (not during the sanity check)."""
        if trainer.sanity_checking:
            return
        row = _floats({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        if row:
            row["step"] = float(trainer.global_step)
            self.val_history.append(row)

    def target_dir(self, trainer: L.Trainer) -> Path | None:
        """Where the report goes: ``dirpath``, else the log directory of a Trainer with a logger, else None."""
        if self.dirpath is not None:
            return self.dirpath
        if trainer.loggers and trainer.log_dir is not None:
            return Path(trainer.log_dir)
        return None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the report."""
        self.write(trainer, pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Write the report of the steps before a failure (or Ctrl-C), saying how the run stopped.

        A failure to write is logged and never replaces the run's own error.
        """
        try:
            self.write(trainer, pl_module, stopped_by=exception)
        except Exception as err:  # noqa: BLE001 - the run's exception is the one to raise
            log.warning("RunReport: the report of the failed run was not written: %s", err)

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule,
              stopped_by: BaseException | None = None) -> Path | None:
        """Write ``report.md`` and the figures; returns the markdown's path (None when there is nowhere to write).

        ``stopped_by``: the exception that ended the run early, named in the report's notes.
        """
        root = self.target_dir(trainer)
        if root is None or not self.history:
            return None
        from lightning_rl.callbacks.completions import CompletionSamples

        samples = [_link(d, root) for cb in trainer.callbacks if isinstance(cb, CompletionSamples)
                   for d in cb.destinations]
        config = "config.yaml" if (root / "config.yaml").is_file() else None
        info = ReportInfo(title=type(pl_module).__name__, hparams=portable(dict(pl_module.hparams)),
                          config_file=config, samples=samples,
                          notes=[f"Device: {pl_module.device}; log dir: {root}", *_stop_note(stopped_by)])
        self.report_path = write_report(self.history, self.val_history, root, info)
        rank_zero_info(f"Report: {self.report_path}")
        return self.report_path

    @override
    def state_dict(self) -> dict[str, Any]:
        """The metric history, so a resumed run reports every step."""
        return {"history": self.history, "val_history": self.val_history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the metric history."""
        self.history = list(state_dict.get("history", []))
        self.val_history = list(state_dict.get("val_history", []))
