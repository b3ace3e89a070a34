"""LightningCLI entry: ``python -m lightning_rl fit --config examples/grpo_arithmetic.yaml`` (or ``lightning-rl``)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI: any LightningModule / LightningDataModule by ``class_path`` (GRPO, PPO, DPO, ...).

    Optimizers are arguments of the modules (``optimizer: OptimizerCallable``), so the CLI's
    automatic ``--optimizer`` is off.
    """
    return LightningCLI(
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
