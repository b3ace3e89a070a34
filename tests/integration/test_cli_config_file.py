"""The CLI saves the run's merged config as ``config.yaml`` in the log folder, never over a file no run wrote.

With ``trainer.logger: false`` the log folder is ``trainer.default_root_dir`` (the working directory by
default), where a user's own ``config.yaml`` may sit; with a logger it is ``lightning_logs/version_N/``.
"""

from pathlib import Path

import pytest
import yaml

from lightning_rl.__main__ import RUN_CONFIG_MARK, main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["--config", str(EXAMPLES / "grpo_arithmetic.yaml"), "--model.init_args.model", "tiny-llama",
        "--model.init_args.model_config", "{num_hidden_layers: 1}", "--model.init_args.lora", "null",
        "--model.init_args.sampling.max_new_tokens", "2", "--model.init_args.num_generations", "2",
        "--data.init_args.batch_size", "2", "--trainer.val_check_interval", "100", "--trainer.enable_progress_bar",
        "false"]
CKPT = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true"]
USERS = "# my own notes: do not lose them\ntrainer:\n  max_steps: 1\n  logger: false\n"


def _fit(root: Path, *extra: str, steps: int = 1):
    return main(["fit", *TINY, "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *extra])


def _refused(capsys, run) -> str:
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: FileExistsError: "), err
    return err[0]


@pytest.mark.parametrize("as_input", [True, False], ids=["the-runs-own-config", "another-file"])
def test_a_users_config_yaml_in_the_run_folder_is_left_byte_identical(as_input, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    user = tmp_path / "config.yaml"
    user.write_text(USERS)
    before = user.read_bytes()
    extra = ["--config", str(user)] if as_input else ["--trainer.logger", "false"]
    line = _refused(capsys, lambda: _fit(tmp_path, *extra))
    assert user.read_bytes() == before
    assert str(user) in line and "--trainer.default_root_dir" in line
    assert ("this run's --config file" if as_input else "not written by a lightning-rl run") in line
    assert not (tmp_path / "checkpoints").exists()  # stopped before the run started


def test_a_second_run_without_a_logger_replaces_the_config_the_first_one_wrote(tmp_path):
    _fit(tmp_path, "--trainer.logger", "false")
    saved = tmp_path / "config.yaml"
    assert f"# {RUN_CONFIG_MARK}" in saved.read_text().splitlines()[:3]
    _fit(tmp_path, "--trainer.logger", "false", "--model.init_args.learning_rate", "0.25")
    assert yaml.safe_load(saved.read_text())["model"]["init_args"]["learning_rate"] == 0.25


def test_the_readme_flow_fit_resume_and_a_resume_into_the_same_version(tmp_path):
    """New version per run (the README's resume); a logger with a fixed version replaces its own run's config."""
    logs = tmp_path / "lightning_logs"
    _fit(tmp_path, *CKPT)
    first = (logs / "version_0" / "config.yaml").read_bytes()
    cli = _fit(tmp_path, *CKPT, "--ckpt_path", str(logs / "version_0" / "checkpoints" / "last.ckpt"), steps=2)
    assert cli.trainer.global_step == 2 and (logs / "version_1" / "config.yaml").is_file()
    assert (logs / "version_0" / "config.yaml").read_bytes() == first
    csv = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"),
           "--trainer.logger.version", "0"]
    _fit(tmp_path, *CKPT, *csv)
    version = tmp_path / "csv" / "lightning_logs" / "version_0"
    cli = _fit(tmp_path, *CKPT, *csv, "--ckpt_path", str(version / "checkpoints" / "last.ckpt"), steps=2)
    assert cli.trainer.global_step == 2
    saved = version / "config.yaml"
    assert yaml.safe_load(saved.read_text())["ckpt_path"].endswith("last.ckpt")
