"""LightningCLI entry: ``python -m lightning_rl fit --config examples/grpo_arithmetic.yaml`` (or ``lightning-rl``)."""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_rl.cli_errors import TRACEBACK_ENV, explain


def main(args: list[str] | None = None) -> Any:
    """Run the CLI: any LightningModule / LightningDataModule by ``class_path`` (GRPO, PPO, DPO, ...).

    Optimizers are arguments of the modules (``optimizer: OptimizerCallable``), so the CLI's
    automatic ``--optimizer`` is off. ``export`` (not a LightningCLI subcommand) writes a checkpoint's
    policy as a Hugging Face folder (see :mod:`lightning_rl.export`). An error this library raises (a bad
    config value, a missing model directory, a reward function that fails) is printed in a few lines with
    the config key it concerns, and the process exits with status 1; set ``LIGHTNING_RL_TRACEBACK=1`` for
    the traceback.
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from lightning_rl.export import main as export_main

        return export_main(argv[1:])
    try:
        return LightningCLI(
            args=args,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
        )
    except Exception as err:
        message = None if os.environ.get(TRACEBACK_ENV) else explain(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
