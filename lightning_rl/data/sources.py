"""Where the rows of a DataModule come from: files, globs, lists of dicts, Hugging Face datasets.

- ``.jsonl`` / ``.json`` / ``.parquet`` file: read here (errors name the line), no extra package.
- ``.csv`` / ``.tsv`` file or a glob (``data/train-*.parquet``): ``datasets.load_dataset`` with the
  format's builder. CSV/TSV cells are read as text, as written (``42`` is the string ``"42"``, ``NA``
  stays ``"NA"``); an empty cell is None.
- a path that names an existing file is read as that file, even with glob characters in its name
  (``train[v2].jsonl``); only a path that is not a file is expanded as a glob.
- ``"hf:<name>"``: ``datasets.load_dataset(name, subset, split=split)``: a dataset on the Hugging
  Face hub, or a local folder laid out like one; a folder written by ``save_to_disk`` is read
  with ``datasets.load_from_disk``.
- a ``datasets.Dataset``, or a ``datasets.DatasetDict`` (its ``split``).
- a list of dicts.

The ``datasets`` package is optional: ``pip install 'lightning-rl[data]'``.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_utilities.core.imports import RequirementCache

from lightning_rl.data.io import Rows, read_rows

HF_PREFIX = "hf:"
_DATASETS = RequirementCache("datasets>=2.14")
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _datasets(what: str) -> Any:
    if not _DATASETS:
        raise ModuleNotFoundError(f"{what} needs the Hugging Face 'datasets' package: pip install 'lightning-rl[data]' "
                                  "(or pass a .jsonl/.json/.parquet file or a list of dicts)")
    import datasets

    return datasets


def _split_of(data: Any, split: str, where: str) -> Any:
    """The ``split`` of a ``DatasetDict`` (a plain ``Dataset`` is returned as is)."""
    if isinstance(data, Mapping):
        if split not in data:
            raise KeyError(f"{where} has no split {split!r} (splits: {sorted(data)}); set train_split= / val_split=")
        return data[split]
    return data


def _hub_rows(name: str, split: str, subset: str | None) -> Rows:
    datasets = _datasets(f"loading {HF_PREFIX}{name}")
    folder = Path(name).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        data = _split_of(datasets.load_from_disk(str(folder)), split, str(folder))
    else:
        try:
            data = datasets.load_dataset(name, subset, split=split)
        except ValueError as err:
            if "Unknown split" not in str(err):
                raise
            raise KeyError(f"{HF_PREFIX}{name} has no split {split!r} ({err}); set train_split= / val_split= to one "
                           "of its splits") from err
    return read_rows(data.to_list())


def _files_rows(files: list[str], where: str) -> Rows:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{where} matches files of formats {sorted(suffixes)}; use one of {sorted(_BUILDERS)}")
    builder = builders.pop()
    datasets = _datasets(f"reading {where}")
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs = _csv_text_kwargs(files, datasets, "\t" if suffixes == {".tsv"} else ",")
    # datasets expands data_files as globs again: escape the names so "train[v2].csv" is that file
    data_files = [glob.escape(f) for f in files]
    return read_rows(datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs).to_list())


def _csv_text_kwargs(files: list[str], datasets: Any, delimiter: str) -> dict[str, Any]:
    """``load_dataset("csv")`` arguments that read every cell as text (an empty cell as None).

    Without them pandas infers a type per column: ``42`` becomes an int (which the prompt and response checks
    refuse, and the file cannot say otherwise) and ``NA`` or ``null`` become None.
    """
    columns: dict[str, None] = {}
    unique = True
    for f in files:
        with open(f, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), [])
        unique = unique and len(set(header)) == len(header)  # pandas renames repeated names ("a", "a.1")
        columns.update(dict.fromkeys(header))
    kwargs: dict[str, Any] = {"delimiter": delimiter, "keep_default_na": False, "na_values": [""]}
    if columns and unique:
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in columns})
    return kwargs


def load_rows(source: Any, split: str = "train", subset: str | None = None) -> Rows:
    """Rows of ``source`` (see the module docstring for the forms it takes).

    Args:
        source: a path, a glob, ``"hf:<name>"``, a ``datasets.Dataset`` / ``DatasetDict`` or a list of dicts.
        split: the split of a ``hf:`` name or a ``DatasetDict``.
        subset: the configuration (subset) of a ``hf:`` name, e.g. ``main`` for ``openai/gsm8k``.
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return _hub_rows(source[len(HF_PREFIX):], split, subset)
    if isinstance(source, (str, Path)):
        text = str(Path(source).expanduser())
        if any(c in text for c in "*?[") and not Path(text).is_file():
            files = sorted(glob.glob(text, recursive=True))
            if not files:
                raise FileNotFoundError(f"no data file matches {text!r} (a path with *, ? or [ that is not an "
                                        "existing file is read as a glob pattern)")
            return _files_rows(files, repr(text))
        if Path(text).suffix.lower() in (".csv", ".tsv"):
            if not Path(text).is_file():
                raise FileNotFoundError(f"data file not found: {text}")
            return _files_rows([text], text)
        return read_rows(source)
    if hasattr(source, "to_list") or (isinstance(source, Mapping) and hasattr(next(iter(source.values()), None),
                                                                              "to_list")):
        return read_rows(_split_of(source, split, "the given DatasetDict").to_list())
    return read_rows(source)
