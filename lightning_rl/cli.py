"""The library's LightningCLI: the config saved without replacing a user's file, unsupported subcommands refused."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_rl.cli_config_file import SaveRunConfig

#: The methods each Trainer entry point runs (one of them has to be defined); ``fit`` needs ``training_step``.
_STEP_METHODS = {"validate": ("validation_step",), "test": ("test_step",), "predict": ("predict_step", "forward")}


class UnsupportedSubcommandError(ValueError):
    """A subcommand the module cannot run (``test`` or ``predict`` with a module that has no step for it)."""


class LightningRLCLI(LightningCLI):
    """LightningCLI that saves the config with :class:`SaveRunConfig` and refuses what a module cannot run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        super().__init__(*args, **kwargs)

    def _check_subcommand(self, subcommand: str) -> None:
        """Raise :class:`UnsupportedSubcommandError` when the module defines no step ``subcommand`` runs."""
        runs = {s: any(is_overridden(m, self.model, L.LightningModule) for m in ms) for s, ms in _STEP_METHODS.items()}
        if runs[subcommand]:
            return
        cls = f"{type(self.model).__module__.split('.')[0]}.{type(self.model).__name__}"
        supported = ["fit", *(s for s, ok in runs.items() if ok)]
        step = " or ".join(f"{m}()" for m in _STEP_METHODS[subcommand])
        raise UnsupportedSubcommandError(
            f"`{subcommand}` runs the module's {step}, which {cls} does not define: it supports "
            f"{' and '.join(f'`{s}`' for s in supported)}. Run `validate` to score the validation prompts, "
            f"or give a module class that defines {step}"
        )

    def before_validate(self) -> None:
        """Refuse ``validate`` for a module without ``validation_step``."""
        self._check_subcommand("validate")

    def before_test(self) -> None:
        """Refuse ``test`` for a module without ``test_step`` (the lightning-rl modules have none)."""
        self._check_subcommand("test")

    def before_predict(self) -> None:
        """Refuse ``predict`` for a module without ``predict_step`` or ``forward`` (the lightning-rl modules)."""
        self._check_subcommand("predict")


__all__ = ["LightningRLCLI", "UnsupportedSubcommandError"]
