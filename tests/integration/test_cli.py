"""LightningCLI runs from the example YAML (tiny model swapped in to keep CI fast)."""

from pathlib import Path

from lightning_rl.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_cli_two_steps_from_example_yaml(tmp_path):
    cli = main(
        [
            "fit",
            "--config", str(EXAMPLES / "grpo_arithmetic.yaml"),
            "--model.init_args.model", "tiny-llama",
            "--model.init_args.lora", "null",
            "--model.init_args.sampling.max_new_tokens", "4",
            "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.batch_size", "2",
        ]
    )
    assert cli.trainer.global_step == 2
    assert cli.model.num_generations == 8  # from the YAML
    # the YAML's reward function was built from its class_path and scored the completions
    assert cli.model.rewards.names == ["numeric_match"]
    assert "train/reward_step" in cli.trainer.logged_metrics or "train/reward" in cli.trainer.callback_metrics
    assert "val/reward" in cli.trainer.callback_metrics


def test_gpu_example_yaml_builds_the_callback_plugin_and_module():
    """The GPU example parses and instantiates (on the CPU: accelerator overridden, no fit, no vLLM needed)."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_rl import GRPO, MemoryAwarePrecision, VLLMRollout

    cli = LightningCLI(
        args=["--config", str(EXAMPLES / "grpo_smollm2_vllm.yaml"), "--trainer.accelerator", "cpu",
              "--model.init_args.model", "tiny-llama", "--trainer.logger", "false"],
        run=False, auto_configure_optimizers=False,
    )
    rollout = [cb for cb in cli.trainer.callbacks if isinstance(cb, VLLMRollout)]
    assert len(rollout) == 1 and rollout[0].execution == "cuda_graphs" and rollout[0].fp32_logits
    plugin = cli.trainer.strategy.precision_plugin
    assert isinstance(plugin, MemoryAwarePrecision) and plugin.optimizer_states == "device"
    assert isinstance(cli.model, GRPO) and cli.model.num_generations == 8 and cli.model.importance_sampling == "token"
    assert cli.datamodule.batch_size == 16
