"""The run's merged config, saved as ``config.yaml`` in its log folder, never over a file no run wrote."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback

#: The header line that marks a ``config.yaml`` as one a run of this CLI wrote (and a later run may replace).
RUN_CONFIG_MARK = "lightning-rl run config: the merged config of the last run that wrote to this folder"


class SaveRunConfig(SaveConfigCallback):
    """Saves the run's merged config as ``config.yaml`` in the log dir, never over a file no run of this CLI wrote.

    A ``config.yaml`` that a run of this CLI wrote (its header holds :data:`RUN_CONFIG_MARK`) is replaced: a
    resumed run in the same version folder, or a second run with ``trainer.logger: false`` in the same folder.
    Any other file there (the user's own config, one of this run's ``--config`` files) stops the run before the
    model is loaded, with a message naming the file.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Save the config on rank 0 (once), or raise ``FileExistsError`` when the file there is not a run's."""
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcasts the directory
        assert log_dir is not None
        path = os.path.join(log_dir, self.config_filename)
        problem = self._refusal(path, trainer) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise FileExistsError(problem)
        if trainer.is_global_zero:
            get_filesystem(log_dir).makedirs(log_dir, exist_ok=True)
            header = self.parser.dump_header
            self.parser.dump_header = [*(header or []), RUN_CONFIG_MARK]
            try:
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            finally:
                self.parser.dump_header = header
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _refusal(self, path: str, trainer: L.Trainer) -> str | None:
        """Why the config cannot be written to ``path`` (an existing file no run of this CLI wrote), or None."""
        fs = get_filesystem(path)
        if not fs.isfile(path):
            return None
        inputs = [Path(p.absolute) for p in (self.config.get("config") or []) if hasattr(p, "absolute")]
        is_input = any(p.is_file() and Path(path).is_file() and p.samefile(path) for p in inputs)
        if not is_input:
            with fs.open(path, "rb") as f:
                head = f.read(4096).decode(errors="replace").splitlines()[:5]
            if f"# {RUN_CONFIG_MARK}" in head:
                return None
        why = ("it is this run's --config file" if is_input
               else "it was not written by a lightning-rl run (your own file?)")
        stop = f"{path} exists and {why}: the run would replace it with its merged config, so it stopped"
        if trainer.logger is None:
            return (f"{stop}. With trainer.logger false the run's files go to trainer.default_root_dir "
                    f"({trainer.default_root_dir}): give the run a folder of its own with --trainer.default_root_dir "
                    "DIR, turn a logger on (each run gets lightning_logs/version_N/), or move the file")
        return (f"{stop}. Give the run a log folder of its own (another --trainer.default_root_dir or logger version), "
                "or move the file")


__all__ = ["RUN_CONFIG_MARK", "SaveRunConfig"]
