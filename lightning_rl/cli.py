"""The library's LightningCLI: the config saved without replacing a user's file, unsupported subcommands refused.

A resume (``--ckpt_path``) that replaces the config's module settings with the checkpoint's says which.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_rl.cli_config_file import SaveRunConfig
from lightning_rl.cli_errors import TRACEBACK_ENV
from lightning_rl.cli_parse_errors import explain_parse_error
from lightning_rl.modules.policy import MODULE_CLASS_KEY

#: The methods each Trainer entry point runs (one of them has to be defined); ``fit`` needs ``training_step``.
_STEP_METHODS = {"validate": ("validation_step",), "test": ("test_step",), "predict": ("predict_step", "forward")}


class UnsupportedSubcommandError(ValueError):
    """A subcommand the module cannot run (``test`` or ``predict`` with a module that has no step for it)."""


class LightningRLCLI(LightningCLI):
    """LightningCLI that saves the config with :class:`SaveRunConfig`, refuses what a module cannot run, and explains
    a config its parser refuses in a few lines (:class:`ExplainingParser`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("parser_class", ExplainingParser)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning's, then a warning naming each module setting the checkpoint's value replaced.

        With ``--ckpt_path`` Lightning's CLI lays the checkpoint's module settings over the config's, so a value
        the config or the command line gave otherwise would be dropped without a word.
        """
        subcommand = self.config.get("subcommand")
        before = _module_settings(self.config, subcommand)
        if not self._parse_settings_without_class_path(subcommand):
            super()._parse_ckpt_path()
        after = _module_settings(self.config, subcommand)
        changed = [(k, v, after.get(k)) for k, v in before.items() if after.get(k) != v]
        if changed:
            listed = "; ".join(f"{k}: {v!r} -> {new!r}" for k, v, new in changed)
            rank_zero_warn(
                f"--ckpt_path: the checkpoint's module settings replace the config's, and these differed (the config's "
                f"value -> the checkpoint's, which this run uses): {listed}. They are the settings its weights were "
                "trained with; to train or evaluate with other settings, start a new run without --ckpt_path from "
                "the exported policy (`lightning-rl export`)."
            )

    def _parse_settings_without_class_path(self, subcommand: str | None) -> bool:
        """Lay the module settings of a checkpoint saved outside the CLI over the config; False for any other.

        ``Trainer.fit`` in Python writes the module's settings without the ``_class_path`` that Lightning's CLI
        reads them by, and Lightning's parse of them fails ("Parsing of ckpt_path hyperparameters failed!"); the
        class the library's modules name in their checkpoints stands in for it.
        """
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return False
        try:  # mapped: only the settings are read, not the weights
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:  # a file in torch's legacy format cannot be mapped
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = checkpoint.get(MODULE_CLASS_KEY)
        if not hparams or "_class_path" in hparams or not isinstance(class_path, str):
            return False
        # what the checkpoint could not store (a lambda or a function of the script: None, or a path in __main__)
        # comes from the config, as it has to be given again in Python
        hparams = {k: v for k, v in hparams.items() if not _unstored(v)}
        model = {"class_path": class_path, "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        return True

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


class ExplainingParser(LightningArgumentParser):
    """Lightning's parser, whose refusals print a few lines: the config key, the statement, the nearest names.

    :func:`~lightning_rl.cli_parse_errors.explain_parse_error` writes them instead of the usage and every value
    given; with ``LIGHTNING_RL_TRACEBACK=1`` jsonargparse's own message is printed.
    """

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True) or os.environ.get(TRACEBACK_ENV):
            super().error(message, ex)
        options = _option_keys(self)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(explain_parse_error(message, prog, options) + "\n")
        self.exit(2)


def _option_keys(parser: Any) -> list[str]:
    """The option keys of ``parser`` and of its subcommands' parsers (``trainer.max_steps``, ...)."""
    keys: list[str] = []
    for action in parser._actions:
        if isinstance(action.dest, str):
            keys.append(action.dest)
        for sub in getattr(action, "_name_parser_map", {}).values():
            keys += [a.dest for a in sub._actions if isinstance(a.dest, str)]
    return keys


def _unstored(value: Any) -> bool:
    """Whether a checkpoint's setting stands for something it could not store.

    A list with None in it (a lambda, a function defined inside another), or an import path into the script that
    wrote it (``__main__.reward``).
    """
    if isinstance(value, (list, tuple)):
        return any(v is None or _unstored(v) for v in value)
    if isinstance(value, dict):
        return _unstored(value.get("class_path"))
    return isinstance(value, str) and value.startswith("__main__.")


def _module_settings(config: Any, subcommand: str | None) -> dict[str, Any]:
    """The module's settings in ``config`` as ``{"init_args.lr": value, ...}`` (empty without a subcommand)."""
    if not subcommand or subcommand not in config or config[subcommand].get("model") is None:
        return {}
    model = config[subcommand].model
    return _flat(model.as_dict() if hasattr(model, "as_dict") else dict(model))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (lists and other values kept whole)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


__all__ = ["ExplainingParser", "LightningRLCLI", "UnsupportedSubcommandError"]
