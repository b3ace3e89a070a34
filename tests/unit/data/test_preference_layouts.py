"""PreferenceDataModule: conversational rows (UltraFeedback / Anthropic-HH layouts) and renamed-column collisions."""

import json

import pytest

from lightning_rl.data import InvalidPreferenceError, PreferenceDataModule
from lightning_rl.data.preferences import split_conversation


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def _rows(rows, **kw):
    dm = PreferenceDataModule(rows, batch_size=len(rows), shuffle=False, **kw)
    dm.setup("fit")
    return dm.train_rows


def test_ultrafeedback_rows_keep_the_prompt_and_train_on_the_assistant_reply(tmp_path):
    row = {"prompt": "What is 2+2?", "chosen": [user("What is 2+2?"), assistant("4")],
           "rejected": [user("What is 2+2?"), assistant("5")], "score_chosen": 9.0}
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text(json.dumps(row) + "\n")
    dm = PreferenceDataModule(str(path), batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt"] == ["What is 2+2?"]
    assert batch["chosen"] == [[assistant("4")]] and batch["rejected"] == [[assistant("5")]]
    assert batch["score_chosen"] == [9.0]


def test_hh_rows_without_prompt_column_take_the_shared_turns_as_prompt():
    history = [user("hi"), assistant("hello"), user("tell me a joke")]
    row = {"chosen": [*history, assistant("a good joke")], "rejected": [*history, assistant("no")]}
    (out,) = _rows([row])
    assert out["prompt"] == history
    assert out["chosen"] == [assistant("a good joke")] and out["rejected"] == [assistant("no")]


def test_conversation_around_a_string_prompt_becomes_the_prompt():
    conv = [system("be brief"), user("2+2?")]
    (out,) = _rows([{"prompt": "2+2?", "chosen": [*conv, assistant("4")], "rejected": [*conv, assistant("5")]}])
    assert out["prompt"] == conv and out["chosen"] == [assistant("4")]


def test_message_list_prompt_and_none_filled_keys_match():
    # a datasets struct column fills keys a message lacks with None
    prompt = [user("hi")]
    row = {"prompt": prompt, "chosen": [{"role": "user", "content": "hi", "name": None}, assistant("hello")],
           "rejected": [user("hi"), assistant("go away")]}
    (out,) = _rows([row])
    assert out["prompt"] == prompt and out["chosen"] == [assistant("hello")]


def test_unpaired_conversations_are_split_for_kto():
    rows = [{"prompt": "q", "completion": [user("q"), assistant("good")], "label": True},
            {"prompt": "r", "completion": [user("r"), assistant("bad")], "label": False}]
    out = _rows(rows, mode="unpaired")
    assert [r["completion"] for r in out] == [[assistant("good")], [assistant("bad")]]
    assert [r["kl_completion"] for r in out] == [[assistant("bad")], [assistant("good")]]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "What is 3+3?", "chosen": [user("What is 2+2?"), assistant("4")],
          "rejected": [user("What is 2+2?"), assistant("5")]}, r"leading messages \[user\] are not the prompt"),
        ({"prompt": "q", "chosen": [user("q"), assistant("4")], "rejected": [user("other"), assistant("5")]},
         "continue different conversations"),
        ({"prompt": "q", "chosen": [user("q"), assistant("4"), user("and?")], "rejected": [user("q"), assistant("5")]},
         "continue different conversations"),
        ({"chosen": [user("q")], "rejected": [user("q")]}, "ends with a non-assistant message"),
    ],
    ids=["other-prompt", "different-conversations", "later-user-turn", "no-reply"],
)
def test_other_conversation_layouts_are_refused_with_the_expected_layouts(row, problem):
    with pytest.raises(InvalidPreferenceError, match=f"row 0 of the training dataset: .*{problem}.*Expected layouts"):
        _rows([row])


def test_refused_conversations_can_be_skipped():
    good = {"prompt": "q", "chosen": [user("q"), assistant("4")], "rejected": [user("q"), assistant("5")]}
    bad = {"prompt": "x", "chosen": [user("q"), assistant("4")], "rejected": [user("q"), assistant("5")]}
    out = _rows([bad, good], on_invalid="skip")
    assert [(r["prompt"], r["index"]) for r in out] == [("q", 0)]


def test_split_conversation_leaves_plain_responses_alone():
    assert split_conversation("p", ["a", [assistant("b")]]) == ("p", ["a", [assistant("b")]])


def test_renamed_prompt_and_chosen_columns_win_over_same_named_columns():
    row = {"question": "Q?", "prompt": "OTHER", "chosen_text": "good", "chosen": "FULL CONVO", "rejected": "bad",
           "source": "s"}
    (out,) = _rows([row], prompt_column="question", chosen_column="chosen_text")
    assert out == {"source": "s", "prompt": "Q?", "chosen": "good", "rejected": "bad", "index": 0}


def test_renamed_columns_win_in_unpaired_mode():
    rows = [{"q": "Q?", "prompt": "OTHER", "text": "good", "completion": "WRONG", "ok": True, "label": False},
            {"q": "R?", "prompt": "OTHER", "text": "bad", "completion": "WRONG", "ok": False, "label": True}]
    out = _rows(rows, mode="unpaired", prompt_column="q", completion_column="text", label_column="ok")
    assert [(r["prompt"], r["completion"], r["label"]) for r in out] == [("Q?", "good", True), ("R?", "bad", False)]
    # paired rows split for KTO ignore a stray completion/label column too
    pairs = [{"prompt": "p", "good": "a", "bad": "b", "completion": "WRONG", "label": "x"}]
    out = _rows(pairs, mode="unpaired", chosen_column="good", rejected_column="bad")
    assert [(r["completion"], r["label"]) for r in out] == [("a", True), ("b", False)]


def test_checks_run_on_the_renamed_column():
    # the identical-pair check sees chosen_text (different from rejected), not the dropped 'chosen'
    row = {"prompt": "p", "chosen_text": "good", "chosen": "bad", "rejected": "bad"}
    (out,) = _rows([row], chosen_column="chosen_text")
    assert out["chosen"] == "good"
