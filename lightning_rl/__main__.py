"""LightningCLI entry: ``python -m lightning_rl fit --config examples/grpo_arithmetic.yaml`` (or ``lightning-rl``)."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> Any:
    """Run the CLI: any LightningModule / LightningDataModule by ``class_path`` (GRPO, PPO, DPO, ...).

    Optimizers are arguments of the modules (``optimizer: OptimizerCallable``), so the CLI's
    automatic ``--optimizer`` is off. ``export`` (not a LightningCLI subcommand) writes a
    checkpoint's policy as a Hugging Face folder (see :mod:`lightning_rl.export`).
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from lightning_rl.export import main as export_main

        return export_main(argv[1:])
    return LightningCLI(
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
