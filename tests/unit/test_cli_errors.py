"""CLI errors lead with the library's message and the config key, with the traceback on request.

The "fit" case runs ``lightning-rl fit``, which fails in ``configure_model`` at the start of Trainer.fit,
before any step: the missing model folder is only looked for there, so the fit cannot be avoided.
"""

import pytest

from lightning_rl import GRPO, MemoryAwarePrecision
from lightning_rl.__main__ import main
from lightning_rl.cli_errors import _argument, explain

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


@pytest.mark.parametrize("data", ["prompt-data", "arithmetic"])
def test_an_empty_training_set_names_the_argument_that_gave_it(data, capsys, monkeypatch, tmp_path):
    """Not ``prompt_column`` (the message quotes the column's name), but ``train_data`` or ``num_train``."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = (["--data", "lightning_rl.PromptDataModule", "--data.train_data", str(empty)] if data == "prompt-data"
             else ["--data.init_args.num_train", "0"])
    with pytest.raises(SystemExit):
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), *extra])
    first = capsys.readouterr().err.strip().splitlines()[0]
    expected = ("error: data.init_args.train_data (lightning_rl.PromptDataModule): ValueError: the training dataset "
                "is empty: `train_data` gave no rows" if data == "prompt-data"
                else "error: data.init_args.num_train (lightning_rl.ArithmeticDataModule): ValueError: num_train must "
                     "be >= 1")
    assert first.startswith(expected), first


def test_cli_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_RL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes"):
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.epsilon_high", "0.1"])


# ----------------------------------------------------------------------------- errors raised during the run
# class paths for the CLI: pytest puts this folder on sys.path, so jsonargparse imports them as test_cli_errors.*


class NaNGRPO(GRPO):
    """A GRPO whose loss is NaN: the run stops with NonFiniteLossError ("... for 3 optimizer steps ...")."""

    def policy_loss(self, exp, rows, out):
        return super().policy_loss(exp, rows, out) * float("nan")


def no_reward(prompts, completions, **columns):
    """Scores nothing: the run stops with RewardError ("... or raise max_unscored_steps")."""
    return [None] * len(completions)


RUN = ["--model.init_args.model_config", "{num_hidden_layers: 1}", "--model.init_args.lora", "null",
       "--model.init_args.sampling.max_new_tokens", "2", "--trainer.max_steps", "5", "--data.init_args.batch_size", "2",
       "--model.init_args.num_generations", "2", "--trainer.val_check_interval", "5"]


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--model", "test_cli_errors.NaNGRPO"], "error: model (test_cli_errors.NaNGRPO): NonFiniteLossError: "),
        (["--model.init_args.reward_funcs", "[test_cli_errors.no_reward]"],
         "error: model (lightning_rl.GRPO): RewardError: no completion got a reward for 3 steps"),
    ],
    ids=["nan-loss", "no-reward"],
)
def test_an_error_during_the_run_names_the_module_not_a_key_its_words_match(extra, first_line, capsys, monkeypatch,
                                                                            tmp_path):
    """"3 optimizer steps" is no ``optimizer`` setting, "raise max_unscored_steps" is advice, not the cause."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), *RUN, *extra])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(first_line), err
    assert len(err) == 2 and "LIGHTNING_RL_TRACEBACK=1" in err[1]


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test wants the exception with its traceback
        return err
    raise AssertionError("nothing was raised")


def test_a_key_is_named_from_the_message_words_only_while_the_object_is_built(make_grpo):
    module = make_grpo(max_prompt_length=16, model="./runs/no-such-dir")
    words = "the loss was NaN for 3 optimizer steps; lower the learning_rate or raise max_unscored_steps"
    assert _argument(words, module, building=True) == "optimizer"  # a construction message names its argument
    assert _argument(words, module, building=False) is None
    assert _argument("prompt 1 has 34 tokens, more than max_prompt_length=16", module, building=False) == \
        "max_prompt_length"
    assert _argument("set `micro_batch_size` to a divisor of 8", module, building=False) == "micro_batch_size"
    assert _argument("model directory './runs/no-such-dir' does not exist", module, building=False) == "model"
    assert _argument("no model was found in the run", module, building=False) is None


def test_a_path_error_from_any_library_is_short_and_export_names_no_config_key(make_grpo, tmp_path):
    missing = tmp_path / "nope.ckpt"
    err = _raised(lambda: open(missing, "rb"))  # as torch.load / Lightning raise it: not this library's frame
    assert explain(err).splitlines()[0] == f"error: FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    assert explain(_raised(lambda: int("x"))) is None  # anything else that is not ours keeps its traceback
    bad = _raised(lambda: make_grpo(epsilon_high=0.1))
    assert explain(bad).startswith("error: model.init_args.epsilon_high (lightning_rl.GRPO): ValueError")
    assert explain(bad, config_keys=False).startswith("error: lightning_rl.GRPO: ValueError: epsilon_high")


# ----------------------------------------------------------------------------- plugins and callbacks
PLUGIN = ("trainer:\n  plugins:\n    - class_path: lightning_rl.MemoryAwarePrecision\n      init_args:\n"
          "        optimizer_states: cpu\n        memory_budget: 0.5\n")


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--trainer.plugins.init_args.step_chunk_bytes=0"],
         "error: trainer.plugins.init_args.step_chunk_bytes (lightning_rl.MemoryAwarePrecision): ValueError: "
         "step_chunk_bytes must be > 0, got 0"),
        (["--trainer.callbacks+=lightning_rl.VLLMRollout", "--trainer.callbacks.prompts_per_step=0"],
         "error: trainer.callbacks.init_args.prompts_per_step (lightning_rl.VLLMRollout): ValueError: "
         "prompts_per_step must be >= 1, got 0"),
    ],
    ids=["plugin", "callback"],
)
def test_an_error_building_a_plugin_or_callback_is_short(extra, first_line, capsys, monkeypatch, tmp_path):
    """jsonargparse keeps a list item's exception only as text in "Does not validate against any of the Union
    subtypes": the library's own message and key are still what the user sees."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    (tmp_path / "plugin.yaml").write_text(PLUGIN)
    with pytest.raises(SystemExit) as info:
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), "--config", str(tmp_path / "plugin.yaml"), *extra])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == first_line, err
    assert len(err) == 2 and "LIGHTNING_RL_TRACEBACK=1" in err[1]


def test_a_memory_plan_error_is_not_blamed_on_a_setting_its_advice_names(capsys, monkeypatch, tmp_path):
    """The advice below the error's first line shows ``quantize='int8'`` and ``optimizer_states='cpu'``: neither
    is the cause of a budget of 1,000,000 bytes."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    (tmp_path / "plugin.yaml").write_text(PLUGIN)
    with pytest.raises(SystemExit) as info:
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), *RUN, "--config", str(tmp_path / "plugin.yaml"),
              "--trainer.plugins.init_args.memory_budget=1000000", "--trainer.max_steps", "1"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: trainer.plugins (lightning_rl.MemoryAwarePrecision): MemoryPlanError: the train "
                             "phase does not fit in the memory budget of 1000000 bytes"), err
    advice = err[err.index("What to change:") + 1]
    assert "raise memory_budget (now 1000000 bytes; a value > 1 is bytes" in advice and "reserved_bytes" in advice


def test_an_error_during_the_run_names_a_key_only_from_its_first_line():
    plugin = MemoryAwarePrecision(quantize=None, optimizer_states="cpu")
    advice = ("the train phase does not fit in the memory budget of 24 bytes: ...\nWhat to change:\n"
              "  - store frozen weights in 8/4 bits: MemoryAwarePrecision(quantize='int8' or 'nf4')\n"
              "  - MemoryAwarePrecision(optimizer_states='cpu')")
    assert _argument(advice, plugin, building=False) is None
    assert _argument("step_chunk_bytes=0 is too small\nraise it", plugin, building=False) == "step_chunk_bytes"


def test_a_trainer_setting_lightning_refuses_is_two_lines_with_the_fix():
    """``trainer.accelerator: gpu`` on a machine without one: Lightning's 34-line traceback, now its message with
    the setting to change."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        raise MisconfigurationException("No supported gpu backend found!")
    except MisconfigurationException as err:
        lines = explain(err).splitlines()
    assert lines[0].startswith("error: trainer.accelerator: MisconfigurationException: No supported gpu backend found! "
                               "This "
                               "machine has no CUDA GPU that torch can use: set trainer.accelerator to auto (or cpu)")
    assert len(lines) == 2
    try:
        raise MisconfigurationException("`max_epochs` must be an integer")  # another setting: its message as is
    except MisconfigurationException as err:
        first = explain(err).splitlines()[0]
    assert first == "error: MisconfigurationException: `max_epochs` must be an integer"  # no config key guessed
