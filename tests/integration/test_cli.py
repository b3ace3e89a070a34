"""LightningCLI runs from the example YAML (tiny model swapped in to keep CI fast)."""

import warnings
from pathlib import Path

import pytest

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
    assert len(rollout) == 1 and rollout[0].settings.execution == "cuda_graphs" and rollout[0].settings.fp32_logits
    plugin = cli.trainer.strategy.precision_plugin
    assert isinstance(plugin, MemoryAwarePrecision) and plugin.optimizer_states == "auto"
    assert isinstance(cli.model, GRPO) and cli.model.num_generations == 8 and cli.model.importance_sampling == "auto"
    assert cli.datamodule.batch_size == 16


def test_the_engines_tensor_parallel_size_parses_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lightning_rl import VLLMRollout

    config = tmp_path / "tp.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_rl.VLLMRollout\n"
        "      init_args:\n"
        "        settings:\n"
        "          tensor_parallel_size: 2\n"
        "          execution: eager\n"
    )
    cli = LightningCLI(
        args=["--config", str(EXAMPLES / "grpo_smollm2_vllm.yaml"), "--config", str(config),
              "--trainer.accelerator", "cpu", "--model.init_args.model", "tiny-llama", "--trainer.logger", "false"],
        run=False, auto_configure_optimizers=False,
    )
    rollout = [cb for cb in cli.trainer.callbacks if isinstance(cb, VLLMRollout)]
    assert len(rollout) == 1
    assert rollout[0].settings.tensor_parallel_size == 2 and rollout[0].settings.execution == "eager"


MODULES = ["lightning_rl.GRPO", "lightning_rl.PPO", "lightning_rl.DPO", "lightning_rl.ORPO", "lightning_rl.KTO"]


@pytest.mark.parametrize("class_path", MODULES)
def test_help_lists_the_arguments_every_module_passes_on(class_path, capsys):
    """``**kwargs`` resolves to the bases' signatures: each shared argument is listed with its doc."""
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", class_path])
    out = capsys.readouterr().out
    for key in ("model", "lora", "learning_rate", "optimizer", "max_prompt_length", "max_unscored_steps"):
        assert f"--model.{key} " in out, key
    if class_path in ("lightning_rl.GRPO", "lightning_rl.PPO"):
        for key in ("sampling.max_new_tokens", "sampling.temperature", "epsilon", "num_mini_batches", "num_iterations"):
            assert f"--model.{key} " in out, key


@pytest.mark.parametrize(("script", "prog"), [("/venv/bin/lightning-rl", "lightning-rl"),
                                              ("/src/lightning_rl/__main__.py", "python -m lightning_rl")])
def test_help_names_the_command_as_typed_and_the_export_command(script, prog, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [script, "--help"])
    with pytest.raises(SystemExit):
        main()
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: {prog} [-c CONFIG] {{fit,validate,test,predict}}"), out[:120]
    assert f"'{prog} export' writes a checkpoint's policy as a Hugging Face folder" in out


@pytest.mark.parametrize(("key", "value"), [("learnin_rate", "0.1"), ("sampling", "{max_new_token: 4}")])
def test_a_mistyped_yaml_key_is_an_error(key, value, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(f"model:\n  class_path: lightning_rl.GRPO\n  init_args:\n"
                      f"    reward_funcs: [lightning_rl.rewards.numeric_match]\n    {key}: {value}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--trainer.logger", "false"])
    err = capsys.readouterr().err
    if key == "learnin_rate":
        assert "model.init_args.learnin_rate" in err and "did you mean 'learning_rate'" in err, err
    else:
        assert "'sampling' has no field 'max_new_token'; did you mean 'max_new_tokens'?" in err, err


TINY = ["--config", str(EXAMPLES / "grpo_arithmetic.yaml"), "--model.init_args.model", "tiny-llama",
        "--model.init_args.model_config", "{num_hidden_layers: 1}", "--model.init_args.lora", "null",
        "--model.init_args.sampling.max_new_tokens", "2", "--model.init_args.num_generations", "2",
        "--data.init_args.batch_size", "2", "--data.init_args.num_val", "2", "--data.init_args.val_batch_size", "2",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def _short_error(capsys, args) -> str:
    """The CLI's first error line, after checking the two-line form and exit status 1."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "LIGHTNING_RL_TRACEBACK=1" in err[1], err
    return err[0]


@pytest.mark.parametrize(("subcommand", "step"), [("test", "test_step()"), ("predict", "predict_step() or forward()")])
def test_test_and_predict_are_refused_in_one_line_and_validate_runs(subcommand, step, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    line = _short_error(capsys, [subcommand, *TINY, "--trainer.default_root_dir", str(tmp_path)])
    assert line.startswith(f"error: UnsupportedSubcommandError: `{subcommand}` runs the module's {step}, which "
                           "lightning_rl.GRPO does not define: it supports `fit` and `validate`"), line
    cli = main(["validate", *TINY, "--trainer.default_root_dir", str(tmp_path / "validate")])
    assert "val/reward" in cli.trainer.callback_metrics


def test_export_errors_are_short(tmp_path, capsys, monkeypatch):
    """A missing checkpoint, a misspelled or wrong ``--module``: two lines and status 1, as ``fit``'s errors."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    line = _short_error(capsys, ["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])
    assert "FileNotFoundError" in line and "nope.ckpt" in line
    main(["fit", *TINY, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
          "--trainer.callbacks.save_last", "true"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    for module in ("GRPo", "DPO"):
        line = _short_error(capsys, ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "x"),
                                     "--module", module])
        assert module in line and "model.init_args" not in line, line  # export has no config keys
    assert not (tmp_path / "x").exists()


def test_a_resume_names_the_module_settings_the_checkpoint_replaced(tmp_path):
    """With ``--ckpt_path`` Lightning's CLI takes the module's settings from the checkpoint: a learning rate or
    group size given on the command line is dropped. The run says which, with both values; a resume with the
    checkpoint's own settings says nothing."""
    main(["fit", *TINY, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
          "--trainer.callbacks.save_last", "true"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    resume = ["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    with pytest.warns(UserWarning, match="module settings replace") as caught:
        cli = main([*resume, "--trainer.max_steps", "2", "--model.init_args.learning_rate", "0.5",
                    "--model.init_args.num_generations", "3"])
    message = next(str(w.message) for w in caught if "module settings replace" in str(w.message))
    assert "init_args.learning_rate: 0.5 ->" in message and "init_args.num_generations: 3 -> 2" in message
    assert cli.trainer.global_step == 2 and cli.model.num_generations == 2  # the checkpoint's, as the warning says
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        main([*resume, "--trainer.max_steps", "3"])
    assert not [w for w in quiet if "module settings replace" in str(w.message)]


def test_a_checkpoint_saved_from_python_resumes_through_the_cli(tmp_path):
    """``Trainer.fit`` in Python stores the module's settings without Lightning's ``_class_path``: the CLI's resume
    failed on it ("Parsing of ckpt_path hyperparameters failed!"). The class the checkpoint names stands in; a
    reward it could not store (a lambda, kept as None) comes from the config."""
    import lightning as L

    from lightning_rl import GRPO, ArithmeticDataModule
    from lightning_rl.rewards import NumericMatch

    module = GRPO(reward_funcs=[NumericMatch(column="answer", position="last"), lambda p, c, **_: [0.0] * len(c)],
                  model="tiny-llama", model_config={"num_hidden_layers": 1}, num_generations=2,
                  sampling={"max_new_tokens": 2}, loss_type="bnpo", learning_rate=5e-4, micro_batch_size=32)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=70, num_val=2, max_operand=9, seed=0, batch_size=2,
                                                        val_batch_size=2))
    ckpt = tmp_path / "api.ckpt"
    trainer.save_checkpoint(ckpt)
    cli = main(["fit", *TINY, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
                "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 2 and type(cli.model) is GRPO
    assert cli.model.loss_type == "bnpo"  # the checkpoint's (the config says dapo)
    assert cli.model.rewards.names == ["numeric_match"]  # a lambda the checkpoint could not store: the config's
