"""A config the CLI's parser refuses: two lines with the config key, the statement and the nearest accepted names,
instead of the usage (45 lines) and a dump of every value given; exit status 2 as before."""

from pathlib import Path

import pytest
import yaml

from lightning_rl.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _config_with(tmp_path, edit) -> str:
    config = yaml.safe_load((EXAMPLES / "grpo_arithmetic.yaml").read_text())
    edit(config)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _refused(capsys, args) -> list[str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "--help` lists the accepted options" in err[1], err
    return err


def _rename(section, old, new):
    def edit(config):
        section(config)[new] = section(config).pop(old)
    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_rename(lambda c: c["model"]["init_args"], "num_generations", "num_generation"),
         "error: model.init_args.num_generation: lightning_rl.GRPO has no argument 'num_generation'; did you mean "
         "'num_generations'"),
        (_rename(lambda c: c["data"]["init_args"], "batch_size", "batchsize"),
         "error: data.init_args.batchsize: lightning_rl.ArithmeticDataModule has no argument 'batchsize'; did you "
         "mean 'batch_size'"),
        (_rename(lambda c: c["model"]["init_args"]["sampling"], "max_new_tokens", "max_new_token"),
         "error: model.init_args.sampling.max_new_token: 'sampling' has no field 'max_new_token'; did you mean "
         "'max_new_tokens'?"),
        (_rename(lambda c: c["trainer"], "max_steps", "max_step"),
         "error: trainer.max_step: `fit` has no option 'trainer.max_step'; did you mean 'trainer.max_steps'"),
        (lambda c: c["model"].update(class_path="lightning_rl.GRPOO"),
         "error: model.class_path: lightning_rl has no 'GRPOO'; did you mean 'GRPO'?"),
    ],
    ids=["module-argument", "datamodule-argument", "dataclass-field", "trainer-option", "class-path"],
)
def test_a_misspelled_key_is_named_with_the_nearest_accepted_one(tmp_path, capsys, monkeypatch, edit, expected):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    err = _refused(capsys, ["fit", "--config", _config_with(tmp_path, edit)])
    assert err[0].startswith(expected), err[0]
    assert "`python -m lightning_rl fit --help`" in err[1]


def test_a_value_of_the_wrong_type_names_its_key_and_the_traceback_switch_gives_jsonargparses_message(
        tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    args = ["fit", "--config", str(EXAMPLES / "grpo_arithmetic.yaml"), "--model.init_args.num_generations", "four"]
    err = _refused(capsys, args)
    assert err[0].startswith("error: model.init_args.num_generations: Expected a <class 'int'>. Got value: four")
    monkeypatch.setenv("LIGHTNING_RL_TRACEBACK", "1")
    with pytest.raises(SystemExit):
        main(args)
    assert "usage:" in capsys.readouterr().err  # jsonargparse's own, whole


def test_a_config_without_a_module_says_so_and_points_at_the_subcommands_help(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    config = tmp_path / "no_model.yaml"
    config.write_text("trainer:\n  max_steps: 1\n")
    err = _refused(capsys, ["fit", "--config", str(config)])
    assert err[0].startswith("error: the config gives no 'model' (a module: model: {class_path: lightning_rl.GRPO"), err
    assert "`python -m lightning_rl fit --help`" in err[1]
