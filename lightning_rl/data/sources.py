"""Where the rows of a DataModule come from: files, globs, lists of dicts, Hugging Face datasets.

- ``.jsonl`` / ``.json`` / ``.parquet`` file: read here (errors name the line), no extra package.
- ``.csv`` / ``.tsv`` file or a glob (``data/train-*.parquet``): ``datasets.load_dataset`` with the
  format's builder.
- ``"hf:<name>"``: ``datasets.load_dataset(name, subset, split=split)``: a dataset on the Hugging
  Face hub, or a local folder laid out like one; a folder written by ``save_to_disk`` is read
  with ``datasets.load_from_disk``.
- a ``datasets.Dataset``, or a ``datasets.DatasetDict`` (its ``split``).
- a list of dicts.

The ``datasets`` package is optional: ``pip install 'lightning-rl[data]'``.
"""

from __future__ import annotations

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
        data = datasets.load_dataset(name, subset, split=split)
    return read_rows(data.to_list())


def _files_rows(files: list[str], where: str) -> Rows:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{where} matches files of formats {sorted(suffixes)}; use one of {sorted(_BUILDERS)}")
    kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    datasets = _datasets(f"reading {where}")
    return read_rows(datasets.load_dataset(builders.pop(), data_files=files, split="train", **kwargs).to_list())


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
        if any(c in text for c in "*?["):
            files = sorted(glob.glob(text, recursive=True))
            if not files:
                raise FileNotFoundError(f"no data file matches {text!r}")
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
