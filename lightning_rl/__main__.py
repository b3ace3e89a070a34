"""LightningCLI entry: ``python -m lightning_rl fit --config examples/grpo_arithmetic.yaml`` (or ``lightning-rl``)."""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning_rl.cli import LightningRLCLI
from lightning_rl.cli_config_file import RUN_CONFIG_MARK
from lightning_rl.cli_errors import TRACEBACK_ENV, explain


def main(args: list[str] | None = None) -> Any:
    """Run the CLI: any LightningModule / LightningDataModule by ``class_path`` (GRPO, PPO, DPO, ...).

    Optimizers are arguments of the modules (``optimizer: OptimizerCallable``), so the CLI's
    automatic ``--optimizer`` is off. ``export`` (not a LightningCLI subcommand) writes a checkpoint's
    policy as a Hugging Face folder (see :mod:`lightning_rl.export`). The merged config is saved as
    ``config.yaml`` in the log folder, never over a file that no run of this CLI wrote
    (:class:`~lightning_rl.cli_config_file.SaveRunConfig`).
    ``test`` and ``predict`` are refused for modules without a step for them. An error this library raises
    (a bad config value, a missing model directory, a reward function that fails), or a missing file, is
    printed in a few lines with the config key it concerns, and the process exits with status 1; set
    ``LIGHTNING_RL_TRACEBACK=1`` for the traceback.
    """
    argv = sys.argv[1:] if args is None else args
    export = argv[:1] == ["export"]
    try:
        if export:
            from lightning_rl.export import main as export_main

            return export_main(argv[1:])
        return LightningRLCLI(args=args, auto_configure_optimizers=False, parser_kwargs=_parser_kwargs())
    except Exception as err:
        message = None if os.environ.get(TRACEBACK_ENV) else explain(err, config_keys=not export)
        if message is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(1) from None


def _parser_kwargs() -> dict[str, str]:
    """The command's name as the user typed it (not ``__main__.py``) and what it runs, for ``--help``."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "python -m lightning_rl" if script in ("__main__.py", "") else script
    return {"prog": prog,
            "description": "Reinforcement-learning fine-tuning of language models with Lightning: fit, validate, test "
                           f"or predict a lightning-rl module from a YAML config; '{prog} export' writes a "
                           "checkpoint's policy as a Hugging Face folder (see its --help)."}


def console_main() -> None:
    """The ``lightning-rl`` command: :func:`main` on ``sys.argv``, its result dropped.

    The console script exits with ``sys.exit(console_main())``, which would print a returned object and exit
    with status 1: :func:`main` returns the CLI (or the export folder) for callers in Python.
    """
    main()


__all__ = ["RUN_CONFIG_MARK", "console_main", "main"]


if __name__ == "__main__":
    main()
