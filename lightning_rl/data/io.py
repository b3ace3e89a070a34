"""Read rows of prompts (or preference pairs) from JSONL, JSON, Parquet, or a list of dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def read_rows(source: str | Path | Sequence[Mapping[str, Any]]) -> Rows:
    """Load rows from ``.jsonl``, ``.json`` (a list), ``.parquet``, or an in-memory list of dicts."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = []
            with path.open() as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{path}:{n} is not valid JSON: {err}") from err
            return _check_dicts(rows, str(path))
        if suffix == ".json":
            data = _load_json(path)
            if not isinstance(data, list):
                raise ValueError(f"{path} must hold a JSON list of objects (one per row)")
            return _check_dicts(data, str(path))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ModuleNotFoundError("reading Parquet needs pyarrow: pip install pyarrow") from None
            return _check_dicts(pq.read_table(path).to_pylist(), str(path))
        raise ValueError(f"unsupported data file {path}: use .jsonl, .json, .parquet or .csv (or a glob of "
                         "them), 'hf:<dataset>', or pass a list of dicts")
    return _check_dicts(list(source), "the given rows")


def _load_json(path: Path) -> Any:
    """Parse a ``.json`` file; errors name the file, line and column (and spot JSON Lines saved as ``.json``)."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path}:{err.lineno}"
        if err.msg == "Extra data" and err.lineno > 1 and _is_json_lines(text):
            jsonl = path.with_suffix(".jsonl").name
            raise ValueError(f"{where} is not valid JSON (extra data after the first line's value): this looks like "
                             f"JSON Lines, one object per line: rename it to {jsonl}") from err
        raise ValueError(f"{where} is not valid JSON: {err.msg} at column {err.colno}") from err


def _is_json_lines(text: str) -> bool:
    """Whether ``text`` starts with a whole JSON value on its first line (then more on the next lines)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _check_dicts(rows: list, where: str) -> Rows:
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"row {i} of {where} is {type(r).__name__}, expected an object with named columns")
    return [dict(r) for r in rows]
