"""What a run leaves besides weights: sample completions, the report, the progress bar, a quiet console."""

import csv
import re
import warnings

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.loggers import CSVLogger

from lightning_rl import SamplingConfig
from lightning_rl.callbacks import CompletionSamples, RLProgressBar, RunReport

PNG = b"\x89PNG\r\n\x1a\n"


def test_grpo_fit_with_csv_logger_leaves_samples_and_report(make_grpo, make_data, prompt_rows, tmp_path, capsys):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=4))
    data = make_data(batch_size=2, val_data=prompt_rows[:2])
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, data)
    log_dir = tmp_path / "lightning_logs" / "version_0"

    # samples: the first step and the end (every_n_steps=10 by default), first two groups of G=2
    with (log_dir / "completions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "prompt", "completion", "reward", "reward/high_ids", "advantage"]
    assert [r["step"] for r in rows] == ["1"] * 4 + ["3"] * 4
    prompts = {r["prompt"] for r in prompt_rows}
    assert all(r["prompt"] in prompts for r in rows)
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]  # grouped by prompt
    assert any(r["completion"] for r in rows)
    for a, b in zip(rows[0::2], rows[1::2]):  # group-normalized advantages of a group of 2 sum to 0
        assert float(a["advantage"]) == pytest.approx(-float(b["advantage"]), abs=1e-5)

    # the report: markdown linking existing PNGs, with the run's final reward and its config
    text = (log_dir / "report.md").read_text()
    links = re.findall(r"\]\((figures/[\w.]+\.png)\)", text)
    stems = {p.split("/")[1][:-4] for p in links}
    assert {"reward", "entropy", "completion_length", "clip_ratio", "loss", "step_time", "memory"} <= stems
    for link in links:
        assert (log_dir / link).read_bytes()[:8] == PNG
    with (log_dir / "metrics.csv").open() as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("train/reward_step")]
    last_reward = float(logged[-1]["train/reward_step"])
    assert re.search(rf"\| reward \| [^|]+ \| {re.escape(f'{last_reward:.4g}')} \|", text)
    assert "| val/reward |" in text
    assert "model: tiny-llama" in text and "num_generations: 2" in text
    assert "[completions.csv](completions.csv)" in text

    # the console: the last step's table, and where the report is
    out = capsys.readouterr().out
    assert "GRPO: sample completions at step 3" in out and rows[-1]["completion"][:10] in out


def test_no_logger_writes_no_files_but_prints_the_table(make_grpo, make_data, tmp_path, monkeypatch, capsys):
    from helpers import make_trainer

    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(max_steps=1)
    trainer.fit(make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3)), make_data(batch_size=1))
    assert list(tmp_path.iterdir()) == []
    assert "sample completions at step 1" in capsys.readouterr().out


def test_progress_bar_counts_steps_and_shows_the_rl_values(make_grpo, make_data, tmp_path):
    module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3), beta=0.05, lora={"r": 4})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, make_data(batch_size=1))
    bar = trainer.progress_bar_callback
    assert type(bar) is RLProgressBar  # in place of Lightning's default RichProgressBar
    assert sum(isinstance(cb, RichProgressBar) for cb in trainer.callbacks) == 1
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description.strip() == "Step" and (task.completed, task.total) == (2, 2)
    shown = bar.get_metrics(trainer, module)
    assert {"loss", "reward", "kl", "tok/s"} <= set(shown)
    assert shown["reward"] == pytest.approx(float(trainer.callback_metrics["train/reward_step"]))
    assert "v_num" not in shown and "Epoch" not in task.description


def test_callbacks_the_user_passed_are_kept(make_grpo, make_data, tmp_path):
    theme = RichProgressBarTheme(description="green")
    own_bar, own_samples, own_report = RichProgressBar(theme=theme), CompletionSamples(every_n_steps=1), RunReport()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[own_bar, own_samples, own_report],
                        default_root_dir=tmp_path)
    trainer.fit(make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3)), make_data(batch_size=1))
    assert trainer.progress_bar_callback is own_bar
    assert [cb for cb in trainer.callbacks if isinstance(cb, CompletionSamples)] == [own_samples]
    assert [cb for cb in trainer.callbacks if isinstance(cb, RunReport)] == [own_report]
    assert len(own_report.history) == 1 and own_report.history[0]["step"] == 1.0


def test_our_calls_raise_no_warnings(make_grpo, make_data, tmp_path):
    """No val data, gradient checkpointing and LoRA: none of the warnings our own calls used to cause."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = make_grpo(num_generations=2, sampling=SamplingConfig(max_new_tokens=3), gradient_checkpointing=True,
                           lora={"r": 4})
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
        trainer.fit(module, make_data(batch_size=2))
    messages = [str(w.message) for w in caught]
    for text in ("across ranks is zero", "gradient_checkpointing", "is_gradient_checkpointing",
                 "validation_step` but have no `val_dataloader", "smaller than the logging interval"):
        assert not [m for m in messages if text in m], (text, messages)
    assert trainer.global_step == 2


def test_report_without_matplotlib_is_markdown_with_one_warning(tmp_path, monkeypatch):
    from lightning_rl import report

    monkeypatch.setattr(report, "_MATPLOTLIB", False)
    history = [{"step": 1.0, "reward": 0.25, "step_time_s": 1.0}, {"step": 2.0, "reward": 0.5, "step_time_s": 1.0}]
    with pytest.warns(UserWarning, match=r"pip install 'lightning-rl\[report\]'") as caught:
        path = report.write_report(history, [], tmp_path, report.ReportInfo(title="GRPO", hparams={"beta": 0.0}))
    assert len(caught) == 1
    text = path.read_text()
    assert "| reward | 0.25 | 0.5 | 0.5 |" in text and "No figures" in text and not (tmp_path / "figures").exists()


def test_report_history_survives_a_checkpoint():
    report = RunReport()
    report.history = [{"step": 1.0, "reward": 0.5}]
    report.val_history = [{"step": 1.0, "val/reward": 0.25}]
    resumed = RunReport()
    resumed.load_state_dict(report.state_dict())
    assert resumed.history == report.history and resumed.val_history == report.val_history


def test_a_run_that_fails_leaves_its_report_and_last_samples(make_grpo, make_data, tmp_path):
    calls = []

    def fails_at_step_three(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the grader's server went away")
        return [float(len(c) % 2) for c in completions]

    module = make_grpo(reward_funcs=[fails_at_step_three], num_generations=2,
                       sampling=SamplingConfig(max_new_tokens=4))
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        num_sanity_val_steps=0)
    with pytest.raises(Exception, match="the grader's server went away"):
        trainer.fit(module, make_data(batch_size=2))
    log_dir = tmp_path / "lightning_logs" / "version_0"
    text = (log_dir / "report.md").read_text()
    assert "The run stopped early with" in text and "the grader's server went away" in text
    with (log_dir / "metrics.csv").open() as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("train/reward_step")]
    assert len(logged) == 2  # the two steps before the failure
    with (log_dir / "completions.csv").open() as fh:
        steps = {r["step"] for r in csv.DictReader(fh)}
    assert steps == {"1", "2"}  # the first step (every_n_steps) and the last one before the failure


def test_the_printed_table_shows_completions_as_written_even_with_rich_markup(capsys):
    """A completion is model output: a ``[/b]`` in it stopped the run at its end (Rich read it as a closing tag),
    and ``[bold]`` vanished from the printed table."""
    from lightning_rl.callbacks import CompletionSamples

    rows = [{"prompt": "p", "completion": "see [/b] here", "reward": 1.0},
            {"prompt": "q", "completion": "a [bold]word[/bold]", "reward": 0.0}]
    CompletionSamples().print_table(rows, 1, "GRPO")
    out = capsys.readouterr().out
    assert "see [/b] here" in out and "a [bold]word[/bold]" in out
