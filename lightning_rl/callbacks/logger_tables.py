"""Write a table of rows through a Lightning logger's own API (CSV file, TensorBoard text, W&B table, MLflow)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger


def cell_text(value: Any, max_chars: int | None = None) -> str:
    """A table cell: chat messages as ``role: content`` lines, floats with 4 significant digits."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(m, Mapping) for m in value):
        text = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    else:
        text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return text


def plain(value: Any) -> Any:
    """Numbers and booleans as they are, anything else as cell text (for CSV, W&B and MLflow tables)."""
    return value if isinstance(value, (int, float, bool)) else cell_text(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], max_chars: int | None = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (newlines and pipes escaped inside cells)."""
    if not rows:
        return ""
    columns = list(rows[0])

    def esc(v: Any) -> str:
        return cell_text(v, max_chars).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """Append ``rows`` with a leading ``step`` column to a CSV file (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["step", *rows[0]])
        for r in rows:
            writer.writerow([step, *(plain(v) for v in r.values())])


def log_table(logger: Logger, key: str, rows: Sequence[Mapping[str, Any]], step: int) -> str | None:
    """Write ``rows`` through ``logger``; returns where it went (a path or a description), None if unsupported.

    - :class:`~lightning.pytorch.loggers.CSVLogger`: appended to ``<log_dir>/<key>.csv``.
    - :class:`~lightning.pytorch.loggers.TensorBoardLogger`: a markdown table under the text tag ``key``.
    - :class:`~lightning.pytorch.loggers.WandbLogger`: a ``wandb.Table`` under ``key``.
    - :class:`~lightning.pytorch.loggers.MLFlowLogger`: a table artifact ``<key>/step_<step>.json``.
    """
    if not rows:
        return None
    columns = list(rows[0])
    if isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / f"{key}.csv"
        append_csv(path, rows, step)
        return str(path)
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, markdown_table(rows), global_step=step)
        return f"TensorBoard text {key!r}"
    if isinstance(logger, WandbLogger):
        logger.log_table(key=key, columns=columns, data=[[plain(r[c]) for c in columns] for r in rows], step=step)
        return f"W&B table {key!r}"
    if isinstance(logger, MLFlowLogger):
        data = {c: [plain(r[c]) for r in rows] for c in columns}
        artifact = f"{key}/step_{step:06d}.json"
        logger.experiment.log_table(logger.run_id, data=data, artifact_file=artifact)
        return f"MLflow artifact {artifact}"
    return None
