"""The end-of-fit report: PNG figures of the logged step metrics and a ``report.md`` that links them.

Pure functions over a metric history (one dict of floats per training step); the
:class:`~lightning_rl.callbacks.RunReport` callback collects the history and calls :func:`write_report`.
Figures need matplotlib (``pip install 'lightning-rl[report]'``); without it the markdown is
written alone, with one warning.
"""

from __future__ import annotations

import datetime
import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning_utilities.core.imports import RequirementCache

_MATPLOTLIB = RequirementCache("matplotlib>=3.5")
MISSING_MATPLOTLIB = "the report's figures need matplotlib: pip install 'lightning-rl[report]'"

History = Sequence[Mapping[str, float]]

# (file stem, title, y label, metric patterns) of the line figures; a figure with no data is left out
FIGURES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("reward", "Reward (mean per step; per function dashed; validation as dots)", "reward",
     ("reward", "reward/*", "val/reward")),
    ("kl", "KL to the reference", "KL", ("kl", "kl_coef")),
    ("entropy", "Token entropy", "nats", ("entropy",)),
    ("completion_length", "Completion length", "tokens", ("completion_length", "completion_length_max")),
    ("clip_ratio", "Clipped fraction of tokens", "fraction",
     ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "value_clip_ratio")),
    ("loss", "Loss", "loss", ("loss", "policy_loss", "value_loss", "nll")),
    ("preference", "Implicit rewards and accuracy", "value",
     ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "accuracy",
      "rewards/desirable", "rewards/undesirable", "val/rewards/accuracy")),
    ("memory", "Device memory per phase", "GiB", ("memory/*_peak_gib", "memory/host_rss_gib")),
)
ROLLOUT_PARTS = ("rollout_time", "rollout/wake_s", "rollout/sync_s", "rollout/generate_s", "rollout/sleep_s")
SUMMARY_KEYS = ("reward", "reward/*", "kl", "entropy", "completion_length", "clip_ratio", "loss",
                "rewards/accuracy", "rewards/margins", "accuracy", "tokens_per_sec", "step_time_s", "memory/*peak_gib",
                "memory/host_rss_gib")


@dataclass
class ReportInfo:
    """What the report says about the run besides its metrics.

    Attributes:
        title: heading, e.g. the module's class name.
        hparams: the module's hyperparameters (plain data).
        config_file: the CLI's saved config next to the report, if any.
        samples: where the sample completions went (paths or descriptions).
        notes: extra lines for the top of the report.
    """

    title: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    config_file: str | None = None
    samples: Sequence[str] = ()
    notes: Sequence[str] = ()


def series(history: History, pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    """``name -> (steps, values)`` of every metric matching ``pattern`` (fnmatch), finite values only."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for name, value in row.items():
            if name == "step" or not fnmatch.fnmatchcase(name, pattern) or not math.isfinite(value):
                continue
            steps, values = out.setdefault(name, ([], []))
            steps.append(int(row["step"]))
            values.append(value)
    return out


def step_times(history: History) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, rollout s, training s, other s)`` per step.

    ``step_time_s`` is the wall time of the batch from the report callback's ``on_train_batch_start``;
    a rollout callback that ran before it (``rollout/*_s``) is added to the rollout part.
    """
    steps, rollout, train, other = [], [], [], []
    for row in history:
        if "step_time_s" not in row:
            continue
        inside = row.get("rollout_time", 0.0)
        t = row.get("train_time", max(row["step_time_s"] - inside, 0.0))
        steps.append(int(row["step"]))
        rollout.append(inside + sum(row.get(k, 0.0) for k in ROLLOUT_PARTS if k != "rollout_time"))
        train.append(t)
        other.append(max(row["step_time_s"] - inside - t, 0.0))
    return steps, rollout, train, other


def write_figures(history: History, val_history: History, out: Path) -> list[tuple[str, Path]]:
    """Write the PNG figures into ``out``; returns ``(title, path)`` of each written figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = [*history, *val_history]
    for stem, title, ylabel, patterns in FIGURES:
        lines = {k: v for p in patterns for k, v in series(rows, p).items()}
        if not lines:
            continue
        fig = Figure(figsize=(7, 3.6), layout="constrained")
        ax = fig.subplots()
        for name, (xs, ys) in lines.items():
            if name.startswith("val/"):
                ax.plot(xs, ys, "o", label=name)
            else:
                style = "--" if name.startswith("reward/") else "-"
                ax.plot(xs, ys, style, label=name, marker="." if len(xs) < 30 else None)
        if stem == "reward":
            band = series(history, "reward_std").get("reward_std")
            mean = series(history, "reward").get("reward")
            if band and mean and len(band[0]) == len(mean[0]):
                lo = [m - s for m, s in zip(mean[1], band[1])]
                hi = [m + s for m, s in zip(mean[1], band[1])]
                ax.fill_between(mean[0], lo, hi, alpha=0.15, label="reward ± std")
        _finish(ax, title, ylabel)
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        written.append((title, path))
    steps, rollout, train, other = step_times(history)
    if steps:
        fig = Figure(figsize=(7, 3.6), layout="constrained")
        ax = fig.subplots()
        ax.bar(steps, rollout, label="rollout (generation)")
        ax.bar(steps, train, bottom=rollout, label="training (log-probs, loss, backward, step)")
        ax.bar(steps, other, bottom=[a + b for a, b in zip(rollout, train)], label="other (rewards, hooks, logging)")
        _finish(ax, "Step time split", "seconds")
        path = out / "step_time.png"
        fig.savefig(path, dpi=100)
        written.append(("Step time split", path))
    return written


def _finish(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def summary_rows(history: History, val_history: History) -> list[tuple[str, str, str, str]]:
    """``(metric, first, last, mean of the last 10%)`` rows for the report's table of final numbers."""
    found: dict[str, list[float]] = {}
    for pattern in SUMMARY_KEYS:
        for name, (_, ys) in series(history, pattern).items():
            found.setdefault(name, ys)
    for name, (_, ys) in series(val_history, "val/*").items():
        found.setdefault(name, ys)
    out = []
    for name, ys in found.items():
        tail = ys[-max(1, len(ys) // 10):]
        out.append((name, f"{ys[0]:.4g}", f"{ys[-1]:.4g}", f"{sum(tail) / len(tail):.4g}"))
    return out


def render_markdown(history: History, val_history: History, info: ReportInfo,
                    figures: Sequence[tuple[str, Path]], root: Path) -> str:
    """The text of ``report.md`` (figure links relative to ``root``)."""
    last = history[-1]["step"] if history else 0
    lines = [f"# Training report: {info.title}", "",
             f"Written {datetime.datetime.now().isoformat(timespec='seconds')}; {len(history)} training batches, "
             f"{int(last)} optimizer steps."]
    wall = [r["step_time_s"] for r in history if "step_time_s" in r]
    if wall:
        lines[-1] += f" Mean step time {sum(wall) / len(wall):.3g} s."
    lines += ["", *info.notes] if info.notes else []
    rows = summary_rows(history, val_history)
    if rows:
        lines += ["", "## Final numbers", "", "| metric | first | last | mean of the last 10% |", "|---|---|---|---|"]
        lines += [f"| {n} | {a} | {b} | {c} |" for n, a, b, c in rows]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({path.relative_to(root).as_posix()})" for title, path in figures]
    elif history:
        lines += ["", f"No figures: {MISSING_MATPLOTLIB}."]
    if info.samples:
        lines += ["", "## Sample completions", "", *(f"- {s}" for s in info.samples)]
    lines += ["", "## Config", ""]
    if info.config_file:
        lines += [f"Full config: [{info.config_file}]({info.config_file})", ""]
    lines += ["Module hyperparameters:", "", "```yaml", yaml.safe_dump(dict(info.hparams), sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)


def write_report(history: History, val_history: History, root: str | Path, info: ReportInfo) -> Path:
    """Write ``<root>/report.md`` and its figures under ``<root>/figures``; returns the markdown's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    if history and _MATPLOTLIB:
        figures = write_figures(history, val_history, root / "figures")
    elif history:
        warnings.warn(f"report without figures: {MISSING_MATPLOTLIB}", UserWarning, stacklevel=2)
    path = root / "report.md"
    path.write_text(render_markdown(history, val_history, info, figures, root))
    return path
