"""PreferenceDataModule: formats, paired/unpaired rows, and bad input."""

import json
import logging

import pytest

from lightning_rl.data import InvalidPreferenceError, PreferenceDataModule
from lightning_rl.data.preferences import kl_partners, read_preference_rows

PAIRS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "a"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go away"}], "source": "b"},
]


def _setup(rows, **kw):
    dm = PreferenceDataModule(rows, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_paired_rows_from_jsonl_keep_extra_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    dm = _setup(str(path))
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["chosen", "index", "prompt", "rejected", "source"]
    assert sorted(batch["index"]) == [0, 1]
    assert dm.train_rows[1]["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_renamed_columns():
    rows = [{"q": "x", "good": "a", "bad": "b"}]
    dm = _setup(rows, prompt_column="q", chosen_column="good", rejected_column="bad")
    assert dm.train_rows == [{"prompt": "x", "chosen": "a", "rejected": "b", "index": 0}]


@pytest.mark.parametrize("missing, arg", [("chosen", "chosen_column"), ("rejected", "rejected_column")])
def test_missing_column_names_the_fix(missing, arg):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    del row[missing]
    with pytest.raises(KeyError, match=f"row 0 of the training dataset has no '{missing}' column.*{arg}="):
        _setup([row])


def test_missing_prompt_and_unpaired_columns():
    with pytest.raises(KeyError, match="no 'prompt' column.*prompt_column="):
        _setup([{"question": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(KeyError, match="no 'label' column.*label_column="):
        _setup([{"prompt": "p", "completion": "a"}], mode="unpaired")
    # KTO's rows given to the paired mode (DPO, ORPO): named as unpaired, with KTO as the fix, not "set chosen_column="
    with pytest.raises(KeyError, match=r"row 0 .* is unpaired \('completion' and 'label' columns, no 'chosen'\).*"
                                       r"KTO and PreferenceDataModule\(mode='unpaired'\)"):
        _setup([{"prompt": "p", "completion": "a", "label": True}])


def test_identical_chosen_and_rejected_errors():
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.raises(InvalidPreferenceError, match="row 0 .* identical chosen and rejected.*on_invalid='skip'"):
        _setup(rows)
    # chat messages with the same content are identical too
    rows = [{"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(InvalidPreferenceError, match="identical"):
        _setup(rows)


@pytest.mark.parametrize("column", ["chosen", "rejected"])
def test_empty_response_errors(column):
    row = {"prompt": "p", "chosen": "a", "rejected": "b", column: "  "}
    with pytest.raises(InvalidPreferenceError, match=f"empty '{column}' response"):
        _setup([row])


def test_skip_drops_bad_rows_with_one_warning(caplog):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"}]
    with caplog.at_level(logging.WARNING):
        dm = _setup(rows, on_invalid="skip")
    assert [r["chosen"] for r in dm.train_rows] == ["good"]
    assert dm.train_rows[0]["index"] == 0
    assert "dropped 2 unusable rows" in caplog.text


def test_all_rows_bad_is_an_error_even_when_skipping():
    with pytest.raises(InvalidPreferenceError, match="no usable rows"):
        _setup([{"prompt": "p", "chosen": "a", "rejected": "a"}], on_invalid="skip")


def test_bad_response_type_and_empty_dataset():
    with pytest.raises(InvalidPreferenceError, match="a response is a string or a list of chat messages"):
        _setup([{"prompt": "p", "chosen": 3, "rejected": "b"}])
    with pytest.raises(ValueError, match="dataset is empty"):
        _setup([])


def test_unpaired_rows_and_paired_rows_split_for_kto():
    rows = [{"prompt": "p1", "completion": "c1", "label": True},
            {"prompt": "p2", "completion": "c2", "label": 0},
            {"prompt": "p3", "chosen": "good", "rejected": "bad"}]
    dm = _setup(rows, mode="unpaired")
    got = [(r["prompt"], r["completion"], r["label"]) for r in dm.train_rows]
    assert got == [("p1", "c1", True), ("p2", "c2", False), ("p3", "good", True), ("p3", "bad", False)]
    assert dm.label_counts() == (2, 2)
    # every row gets another row's completion for the KL estimate
    partners = {r["index"]: r["kl_completion"] for r in dm.train_rows}
    assert all(partners[r["index"]] != r["completion"] for r in dm.train_rows)
    assert sorted(partners.values()) == sorted(r["completion"] for r in dm.train_rows)


def test_unpaired_bad_label_and_empty_completion():
    with pytest.raises(InvalidPreferenceError, match="label must be true"):
        _setup([{"prompt": "p", "completion": "c", "label": "maybe"}], mode="unpaired")
    with pytest.raises(InvalidPreferenceError, match="empty 'completion' response"):
        _setup([{"prompt": "p", "completion": "", "label": True}], mode="unpaired")


def test_kl_partners_is_a_derangement():
    for n in (2, 3, 10):
        p = kl_partners(n, seed=1)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))


def test_bad_arguments_and_formats(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        PreferenceDataModule(PAIRS, mode="pairs")
    with pytest.raises(ValueError, match="on_invalid"):
        PreferenceDataModule(PAIRS, on_invalid="ignore")
    bad = tmp_path / "x.txt"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        _setup(str(bad))


def test_hf_dataset_needs_datasets_or_loads(monkeypatch):
    from lightning_rl.data import sources

    monkeypatch.setattr(sources, "_DATASETS", False)  # as if datasets were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-rl\[data\]'"):
        read_preference_rows("hf:trl-lib/ultrafeedback_binarized")

    class FakeDataset:  # the part of datasets.Dataset that is used
        def to_list(self):
            return [dict(r) for r in PAIRS]

    dm = _setup(FakeDataset())
    assert len(dm.train_rows) == 2


def test_reference_dataloader_is_ordered():
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    dm = PreferenceDataModule(rows, batch_size=2, val_batch_size=4)
    idx = [i for b in dm.reference_dataloader("train") for i in b["index"]]
    assert idx == [0, 1, 2, 3, 4]
    assert dm.reference_dataloader("val") is None


@pytest.mark.parametrize(("cls", "fix"), [("DPO", "online=True"), ("ORPO", "mode='paired'")])
def test_pair_methods_name_the_missing_column_and_the_fix(cls, fix):
    import lightning_rl

    module = getattr(lightning_rl, cls)(model="tiny-llama", model_config={"num_hidden_layers": 1})
    module.configure_model()
    with pytest.raises(KeyError, match=f"{cls} needs paired rows with a 'rejected' column") as info:
        module.batch_sequences({"prompt": ["say 1"], "chosen": ["1"]})
    assert fix in str(info.value)
    seqs = module.batch_sequences({"prompt": ["a", "b"], "chosen": ["1", "2"], "rejected": ["3", "4"]})
    assert seqs.prompt_ids.shape[0] == 4  # chosen rows, then rejected rows
