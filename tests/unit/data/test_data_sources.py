"""Prompt data from Hugging Face datasets (saved to disk, a hub-style folder, objects), CSV files and globs."""

import json

import datasets
import pytest

from lightning_rl.data import PreferenceDataModule, PromptDataModule, sources
from lightning_rl.data.sources import load_rows

ROWS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files datasets writes for local files out of the home cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def _saved(tmp_path):
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(path))
    return path


def test_hf_name_of_a_dataset_saved_to_disk_with_splits(tmp_path):
    dm = PromptDataModule(train_data=f"hf:{_saved(tmp_path)}", val_data=f"hf:{_saved(tmp_path)}", batch_size=2)
    dm.setup("fit")
    assert dm.train_rows == ROWS[:4] and dm.val_rows == ROWS[4:]
    with pytest.raises(KeyError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        load_rows(f"hf:{tmp_path / 'saved'}", "validation")


def test_hf_name_of_a_hub_style_folder_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "my_org__arith"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:5]))
    (folder / "test.jsonl").write_text(json.dumps(ROWS[5]))
    dm = PromptDataModule(train_data=f"hf:{folder}", val_data=f"hf:{folder}", val_split="test")
    dm.setup("fit")
    assert dm.train_rows == ROWS[:5] and dm.val_rows == ROWS[5:]
    # a split it does not have: named, with its splits and the setting to change (not datasets' raw ValueError)
    with pytest.raises(KeyError, match=r"has no split .*validation.*Unknown split.*train.*test.*set "
                                       r"train_split= / val_split="):
        PromptDataModule(train_data=f"hf:{folder}", val_data=f"hf:{folder}", val_split="validation").setup("fit")


def test_dataset_and_dataset_dict_objects(tmp_path):
    dm = PromptDataModule(train_data=datasets.Dataset.from_list(ROWS), batch_size=3)
    assert [b["answer"] for b in dm.train_dataloader()] != []
    assert dm.train_rows == ROWS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:3])})
    dm = PromptDataModule(train_data=dd, val_data=dd)
    dm.setup("fit")
    assert dm.train_rows == ROWS[:2] and dm.val_rows == ROWS[2:3]


def test_csv_and_globs(tmp_path):
    (tmp_path / "p.csv").write_text('question,answer\n"What is 1, then 2?",3\nhi,4\n')
    dm = PromptDataModule(train_data=str(tmp_path / "p.csv"), prompt_column="question")
    dm.setup("fit")
    assert dm.train_rows == [{"prompt": "What is 1, then 2?", "answer": "3"}, {"prompt": "hi", "answer": "4"}]
    for i in range(2):
        (tmp_path / f"part-{i}.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3 * i: 3 * i + 3]))
    assert load_rows(str(tmp_path / "part-*.jsonl")) == ROWS
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        load_rows(str(tmp_path / "none-*.jsonl"))
    (tmp_path / "part-9.csv").write_text("prompt\nx\n")
    with pytest.raises(ValueError, match="formats"):
        load_rows(str(tmp_path / "part-*"))


def test_without_datasets_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_DATASETS", False)
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    for source in ("hf:openai/gsm8k", str(tmp_path / "p.csv")):
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-rl\[data\]'"):
            load_rows(source)
    assert load_rows(ROWS) == ROWS  # lists and .jsonl/.json/.parquet need no extra package


def test_csv_and_tsv_cells_are_text(tmp_path):
    """pandas would read 42 as an int (refused as a response or prompt) and NA/null as None."""
    (tmp_path / "prefs.csv").write_text("prompt,chosen,rejected\nWhat is 6*7?,42,41\n2024,4,5\n")
    dm = PreferenceDataModule(str(tmp_path / "prefs.csv"), batch_size=2)
    dm.setup("fit")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in dm.train_rows] == [
        ("What is 6*7?", "42", "41"), ("2024", "4", "5")]
    (tmp_path / "p.tsv").write_text("\ufeffprompt\tanswer\tnote\n2024\t007\tNA\nhi\t\tnull\n")
    assert load_rows(str(tmp_path / "p.tsv")) == [{"prompt": "2024", "answer": "007", "note": "NA"},
                                                  {"prompt": "hi", "answer": None, "note": "null"}]


def test_an_existing_file_with_glob_characters_in_its_name_is_read_as_a_file(tmp_path):
    (tmp_path / "train[v2].jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "v.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert load_rows(str(tmp_path / "train[v2].jsonl")) == ROWS[:1]
    (tmp_path / "t[v].csv").write_text("prompt\nx\n")
    assert load_rows(str(tmp_path / "t[v].csv")) == [{"prompt": "x"}]
    # a path that is not a file is still a glob: [v2] matches one character
    assert load_rows(str(tmp_path / "[v2].jsonl")) == ROWS[1:2]
    with pytest.raises(FileNotFoundError, match=r"no data file matches .*not an existing file is read as a glob"):
        load_rows(str(tmp_path / "train[v3].jsonl"))
