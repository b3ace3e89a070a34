"""Every example runs: each YAML parses and trains one step on the CPU (tiny model), leaving samples and a report."""

import csv
import json
from pathlib import Path

import pytest

from lightning_rl.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["--model.init_args.model", "tiny-llama", "--model.init_args.model_config", '{"num_hidden_layers": 1}']
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "margin"]
# example -> (extra overrides, sample-table columns)
RUNS = {
    "grpo_arithmetic.yaml": (["--model.init_args.sampling.max_new_tokens", "4"],
                             ["prompt", "completion", "reward", "reward/numeric_match", "advantage"]),
    "ppo_arithmetic.yaml": (["--model.init_args.sampling.max_new_tokens", "4", "--data.init_args.batch_size", "2"],
                            ["prompt", "completion", "reward", "reward/numeric_match", "kl", "advantage"]),
    # a dense reward, so the two sampled answers of a prompt do not tie (ties are left out of online DPO)
    "dpo_online_smollm2.yaml": (["--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.reward_funcs",
                                 '["helpers.char_codes"]'], PAIR_COLUMNS),
    "dpo_smollm2.yaml": (["--model.init_args.max_completion_length", "24"], PAIR_COLUMNS),
    "orpo_smollm2.yaml": (["--model.init_args.max_completion_length", "24"], PAIR_COLUMNS),
    "kto_smollm2.yaml": (["--model.init_args.max_completion_length", "24"],
                         ["prompt", "completion", "label", "reward"]),
}
NOT_RUN_HERE = {"grpo_smollm2_vllm.yaml"}  # needs CUDA and vLLM: built without fitting in test_cli.py


def test_every_example_yaml_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(RUNS) | NOT_RUN_HERE


def _fit(config: Path, extra: list[str], tmp_path: Path, steps: int = 1):
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}})
    return main(["fit", "--config", str(config), *TINY, *extra, "--trainer.max_steps", str(steps),
                 "--trainer.accelerator", "cpu", "--trainer.logger", logger, "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_yaml_runs_one_step(name, tmp_path):
    extra, columns = RUNS[name]
    cli = _fit(EXAMPLES / name, extra, tmp_path)
    assert cli.trainer.global_step >= 1
    assert list(cli.model.last_samples.columns) == columns
    log_dir = Path(cli.trainer.log_dir)
    with (log_dir / "completions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", *columns] and all(r["prompt"] for r in rows)
    assert (log_dir / "report.md").is_file() and (log_dir / "config.yaml").is_file()
    assert "[config.yaml](config.yaml)" in (log_dir / "report.md").read_text()


def test_python_api_example_runs(monkeypatch, tmp_path, capsys):
    import runpy

    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(EXAMPLES / "grpo_python_api.py"))
    script["main"]("tiny-llama")
    assert "train/reward" in capsys.readouterr().out


def test_hub_dataset_by_name_from_yaml(tmp_path):
    """``train_data: hf:<name>`` in YAML (a dataset saved to disk stands in for the hub: no network)."""
    import datasets

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]),
                          "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(str(tmp_path / "arith"))
    config = tmp_path / "grpo_hub.yaml"
    config.write_text(f"""
model:
  class_path: lightning_rl.GRPO
  init_args:
    reward_funcs: [{{class_path: lightning_rl.rewards.NumericMatch, init_args: {{column: answer}}}}]
    num_generations: 2
    sampling:
      max_new_tokens: 4
data:
  class_path: lightning_rl.PromptDataModule
  init_args:
    train_data: hf:{tmp_path / "arith"}
    val_data: hf:{tmp_path / "arith"}
    batch_size: 2
trainer:
  val_check_interval: 2
  check_val_every_n_epoch: null
  log_every_n_steps: 1
""")
    cli = _fit(config, [], tmp_path, steps=2)
    assert cli.datamodule.train_rows == rows[:6] and cli.datamodule.val_rows == rows[6:]
    assert cli.trainer.global_step == 2 and "val/reward" in cli.trainer.callback_metrics
