"""read_rows, PromptDataModule and the arithmetic task."""

import json

import pytest

from lightning_rl.data import ArithmeticDataModule, PromptDataModule, arithmetic_splits, read_rows

ROWS = [{"prompt": "1+1?", "answer": "2", "level": 1}, {"prompt": "2+3?", "answer": "5", "level": 2}]


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_rows(path) == ROWS
    assert read_rows(str(path)) == ROWS


def test_read_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert read_rows(path) == ROWS
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(ValueError, match="JSON list of objects"):
        read_rows(path)


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(path) == ROWS


def test_read_list_of_dicts_copies_rows():
    rows = read_rows(ROWS)
    assert rows == ROWS
    rows[0]["answer"] = "changed"
    assert ROWS[0]["answer"] == "2"


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "d.txt"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"use \.jsonl, \.json, \.parquet or \.csv"):
        read_rows(bad)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2 is not valid JSON"):
        read_rows(broken)
    with pytest.raises(ValueError, match="row 1 of the given rows is str"):
        read_rows([{"prompt": "a"}, "b"])


def _batches(dm):
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_batches_carry_extra_columns():
    dm = PromptDataModule(train_data=ROWS * 3, batch_size=4, shuffle=False)
    batches = _batches(dm)
    assert [len(b["prompt"]) for b in batches] == [4, 2]
    assert batches[0] == {"prompt": ["1+1?", "2+3?"] * 2, "answer": ["2", "5"] * 2, "level": [1, 2] * 2}
    assert list(dm.val_dataloader()) == []  # no validation data: no batches


def test_prompt_column_is_renamed():
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    dm = PromptDataModule(train_data=rows, val_data=rows[:1], prompt_column="question", batch_size=2,
                          shuffle=False)
    (batch,) = _batches(dm)
    assert batch == {"prompt": ["q1", "q2"], "answer": ["1", "2"]}
    (val,) = list(dm.val_dataloader())
    assert val == {"prompt": ["q1"], "answer": ["1"]}


def test_renamed_prompt_column_wins_over_a_column_named_prompt():
    rows = [{"question": "What is 2+2?", "prompt": "IGNORE ME", "answer": "4"}]
    dm = PromptDataModule(train_data=rows, val_data=rows, prompt_column="question", batch_size=1, shuffle=False)
    (batch,) = _batches(dm)
    assert batch == {"prompt": ["What is 2+2?"], "answer": ["4"]}
    assert list(dm.val_dataloader()) == [batch]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_batch_has_every_column_whatever_rows_it_holds(shuffle):
    rows = [{"prompt": "a"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3", "level": 1}]
    for order in (rows, rows[::-1]):
        dm = PromptDataModule(train_data=order, batch_size=1, shuffle=shuffle)
        batches = _batches(dm)
        assert all(set(b) == {"prompt", "answer", "level"} for b in batches)
        by_prompt = {b["prompt"][0]: (b["answer"][0], b["level"][0]) for b in batches}
        assert by_prompt == {"a": (None, None), "b": ("2", None), "c": ("3", 1)}


def test_collate_rows_takes_the_union_of_the_columns():
    from lightning_rl.data import collate_rows

    assert collate_rows([{"p": "a"}, {"p": "b", "answer": "2"}]) == {"p": ["a", "b"], "answer": [None, "2"]}
    assert collate_rows([{"p": "b", "answer": "2"}, {"p": "a"}]) == {"p": ["b", "a"], "answer": ["2", None]}


def test_missing_prompt_column_names_column_and_fix():
    dm = PromptDataModule(train_data=[{"question": "q"}], batch_size=1)
    with pytest.raises(KeyError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "'prompt'" in msg and "['question']" in msg and "prompt_column=" in msg


def test_missing_column_in_a_later_row():
    dm = PromptDataModule(train_data=[{"q": "a"}, {"p": "b"}], prompt_column="q", batch_size=1)
    with pytest.raises(KeyError, match="row 1 of the training dataset has no 'q' column"):
        dm.setup("fit")


def test_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="training dataset is empty"):
        PromptDataModule(train_data=[], batch_size=1).setup("fit")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="dataset is empty"):
        PromptDataModule(train_data=empty).setup("fit")
    with pytest.raises(ValueError, match="validation dataset is empty"):
        PromptDataModule(train_data=ROWS, val_data=[]).setup("fit")


@pytest.mark.parametrize("prompt", ["", None, 3, [], ["not a message"]])
def test_bad_prompt_values(prompt):
    with pytest.raises(ValueError, match="a prompt is a non-empty string or a list of chat messages"):
        PromptDataModule(train_data=[{"prompt": prompt}]).setup("fit")


def test_chat_message_prompts_are_accepted():
    msgs = [{"role": "user", "content": "hi"}]
    (batch,) = _batches(PromptDataModule(train_data=[{"prompt": msgs}], batch_size=1))
    assert batch["prompt"] == [msgs]


def test_missing_train_data_and_bad_batch_size():
    with pytest.raises(ValueError, match="needs train_data="):
        PromptDataModule().setup("fit")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PromptDataModule(train_data=ROWS, batch_size=0)


# ------------------------------------------------------------------------------ arithmetic task


def test_arithmetic_deterministic_by_seed():
    a = arithmetic_splits(20, 10, seed=3)
    assert a == arithmetic_splits(20, 10, seed=3)
    assert a != arithmetic_splits(20, 10, seed=4)


def test_arithmetic_splits_disjoint_and_correct():
    train, val = arithmetic_splits(60, 30, ops=("+", "-", "*"), seed=0, chat=False)
    assert len(train) == 60 and len(val) == 30
    questions = [r["question"] for r in train + val]
    assert len(set(questions)) == 90  # all distinct, so train and val are disjoint
    for r in train + val:
        a, op, b = r["question"].split("?")[0].split()[-3:]
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert r["prompt"] == r["question"]


def test_arithmetic_chat_prompts():
    train, _ = arithmetic_splits(2, 1)
    assert train[0]["prompt"] == [{"role": "user", "content": train[0]["question"]}]


def test_arithmetic_errors():
    with pytest.raises(ValueError, match=r"only 100 distinct problems exist.*num_train \+ num_val = 101"):
        arithmetic_splits(71, 30)
    with pytest.raises(ValueError, match=r"unsupported operators \['/'\]"):
        arithmetic_splits(1, 1, ops=("/",))
    with pytest.raises(ValueError, match="max_operand"):
        arithmetic_splits(1, 1, min_operand=5, max_operand=2)


def test_arithmetic_datamodule():
    dm = ArithmeticDataModule(num_train=6, num_val=4, batch_size=3, shuffle=False, seed=1)
    train, val = arithmetic_splits(6, 4, seed=1)
    batches = _batches(dm)
    assert [q for b in batches for q in b["question"]] == [r["question"] for r in train]
    assert set(batches[0]) == {"prompt", "answer", "question"}
    assert [a for b in dm.val_dataloader() for a in b["answer"]] == [r["answer"] for r in val]


def test_bad_json_names_the_file_and_line(tmp_path):
    broken = tmp_path / "b.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(ValueError, match=r"b\.json:3 is not valid JSON: Expecting value at column 14") as info:
        read_rows(broken)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_json_lines_saved_as_json_says_to_rename(tmp_path):
    lines = tmp_path / "train.json"
    lines.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"train\.json:2 is not valid JSON.*looks like JSON Lines.*rename it to "
                                         r"train\.jsonl"):
        read_rows(lines)
    # two JSON values that are not one per line: no JSON Lines hint
    multi = tmp_path / "m.json"
    multi.write_text('{"prompt":\n "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"m\.json:3 is not valid JSON: Extra data") as info:
        read_rows(multi)
    assert "JSON Lines" not in str(info.value)
