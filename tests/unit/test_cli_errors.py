"""CLI errors lead with the library's message and the config key, with the traceback on request.

The "fit" case runs ``lightning-rl fit``, which fails in ``configure_model`` at the start of Trainer.fit,
before any step: the missing model folder is only looked for there, so the fit cannot be avoided.
"""

import pytest

from lightning_rl.__main__ import main

CLI = ["fit", "--config", "examples/grpo_arithmetic.yaml", "--model.init_args.model", "tiny-llama",
       "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--model.init_args.epsilon_high", "0.1"],
         "error: model.init_args.epsilon_high (lightning_rl.GRPO): ValueError: epsilon_high (0.1) is below epsilon"),
        (["--model.init_args.sampling.top_k", "-5"],
         "error: model.init_args.sampling.top_k: ValueError: top_k must be a positive number"),
        (["--model.init_args.model", "./checkpoints/no-such-dir"],
         "error: model.init_args.model (lightning_rl.GRPO): FileNotFoundError: model directory "
         "'./checkpoints/no-such-dir' does not exist"),
    ],
    ids=["construction", "sampling", "fit"],
)
def test_cli_errors_lead_with_the_library_message_and_config_key(extra, first_line, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), *extra])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(first_line), err
    assert len(err) == 2 and "LIGHTNING_RL_TRACEBACK=1" in err[1]


def test_cli_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_RL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes"):
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.epsilon_high", "0.1"])
