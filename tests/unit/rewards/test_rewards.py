"""Built-in rewards and RewardSet: weights, None handling, and clear errors."""

import math
import warnings

import pytest
import torch

from lightning_rl.rewards import LengthPenalty, NumericMatch, RegexFormat, RewardError, RewardSet, extract_number

P3 = ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    ("text", "position", "want"),
    [
        ("12 + 7 = 19", "last", 19.0),
        ("12 + 7 = 19", "first", 12.0),
        ("it is 1,234 apples", "last", 1234.0),
        ("minus: -5", "last", -5.0),
        ("-2.5 degrees", "first", -2.5),
        ("no digits here", "last", None),
    ],
)
def test_extract_number(text, position, want):
    assert extract_number(text, position) == want


def test_numeric_match_last_and_first():
    completions = ["3 + 4 is 7", "7, not 3", "seven", "1,234", "-5"]
    answers = ["7", "7", "7", "1234", "-5"]
    assert NumericMatch()(P3, completions, answer=answers) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert NumericMatch(position="first")(P3, completions, answer=answers) == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_numeric_match_other_column_tolerance_and_unparseable_answer():
    fn = NumericMatch(column="target", tolerance=0.01)
    with pytest.warns(UserWarning, match="'target' answer 'n/a'"):
        assert fn(P3, ["3.14159", "3.2", "2"], target=["3.14", 3.14, "n/a"]) == [1.0, 0.0, None]


def test_numeric_match_missing_column_names_it():
    with pytest.raises(KeyError, match=r"'answer'.*columns present: \['question'\]"):
        NumericMatch()(P3, ["1"], question=["q"])
    with pytest.raises(ValueError, match="position"):
        NumericMatch(position="middle")


def test_regex_format_full_and_search():
    full = RegexFormat(r"<a>\d+</a>", reward=0.5)
    assert full(P3, ["<a>12</a>", "  <a>3</a>\n", "x <a>3</a>", "<a>x</a>"]) == [0.5, 0.5, 0.0, 0.0]
    search = RegexFormat(r"<a>\d+</a>", full=False)
    assert search(P3, ["x <a>3</a> y", "<a></a>"]) == [1.0, 0.0]


def test_length_penalty_tokens_and_chars():
    fn = LengthPenalty(target=2, coef=0.5)
    # characters when no token ids are given
    assert fn(P3, ["abcde", "ab", ""]) == [-1.5, 0.0, 0.0]
    # tokens when completion_ids is given (the modules pass it): lengths 3, 1, 6
    assert fn(P3, ["abcde", "ab", ""], completion_ids=[[1, 2, 3], [4], [5] * 6]) == [-0.5, 0.0, -2.0]
    with pytest.raises(ValueError, match="target and coef"):
        LengthPenalty(target=-1)


def _one(prompts, completions, **kw):
    return [1.0] * len(completions)


def _index(prompts, completions, **kw):
    return [float(i) for i in range(len(completions))]


def test_reward_set_weights_and_per_function_values():
    rs = RewardSet([_one, _index], weights=[2.0, 0.5])
    total, per_fn = rs(P3, ["a", "b", "c"], {})
    torch.testing.assert_close(per_fn, torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(total, torch.tensor([2.0, 2.5, 3.0]))
    assert rs.names == ["_one", "_index"]
    assert RewardSet([_one, _one]).names == ["_one", "_one_2"]
    assert RewardSet([NumericMatch()]).names == ["numeric_match"]


def test_reward_set_none_handling():
    def partial(prompts, completions, **kw):
        return [None, 3.0, None]

    def sometimes(prompts, completions, **kw):
        return [1.0, None, None]

    total, per_fn = RewardSet([partial, sometimes], weights=[1.0, 10.0])(P3, ["a", "b", "c"], {})
    # None is left out of the sum; all None -> NaN total
    assert total[:2].tolist() == [10.0, 3.0]
    assert math.isnan(total[2].item())
    assert torch.isnan(per_fn[0, 0]) and torch.isnan(per_fn[2]).all()


def _boom_on_x(prompts, completions, **kw):
    out = []
    for c in completions:
        if "x" in c:
            raise ZeroDivisionError("cannot score x")
        out.append(1.0)
    return out


def test_raising_function_named_with_the_failing_sample():
    rs = RewardSet([_one, _boom_on_x])
    with pytest.raises(RewardError) as info:
        rs(P3 + ["p3"], ["a", "b", "x!", "x"], {"answer": ["1", "2", "3", "4"]})
    msg = str(info.value)
    assert "'_boom_on_x'" in msg and "ZeroDivisionError" in msg and "cannot score x" in msg
    assert "sample 2" in msg and "'x!'" in msg and "'p2'" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_function_failing_only_on_the_whole_batch():
    def batch_only(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(RewardError, match=r"'batch_only' raised RuntimeError: batch too big on the batch of 3"):
        RewardSet([batch_only])(P3, ["a", "b", "c"], {})


@pytest.mark.parametrize(("result", "got"), [([1.0, 2.0], "2 values"), (None, "None")])
def test_wrong_number_of_values(result, got):
    def bad(prompts, completions, **kw):
        return result

    with pytest.raises(RewardError, match=rf"'bad' returned {got} for 3 completions; it must return one float"):
        RewardSet([bad])(P3, ["a", "b", "c"], {})


def test_non_numeric_and_infinite_values():
    def text(prompts, completions, **kw):
        return [1.0, "good", 0.0]

    with pytest.raises(RewardError, match=r"'text' returned 'good' for sample 1; expected a float or None"):
        RewardSet([text])(P3, ["a", "b", "c"], {})

    def inf(prompts, completions, **kw):
        return [1.0, float("inf"), 0.0]

    with pytest.raises(RewardError, match="'inf' returned an infinite value"):
        RewardSet([inf])(P3, ["a", "b", "c"], {})


def test_tensor_values_are_turned_into_floats():
    def tensor_values(prompts, completions, **kw):
        return torch.tensor([1, 0, 1])

    total, _ = RewardSet([tensor_values])(P3, ["a", "b", "c"], {})
    assert total.tolist() == [1.0, 0.0, 1.0]


def test_functions_get_only_the_columns_they_accept():
    seen = {}

    def strict(prompts, completions, answer):
        seen["strict"] = answer
        return [float(a) for a in answer]

    def keyword_all(prompts, completions, **columns):
        seen["all"] = sorted(columns)
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2", "3"], "difficulty": ["easy"] * 3, "completion_ids": [[1], [2], [3]]}
    total, _ = RewardSet([strict, keyword_all])(P3, ["a", "b", "c"], columns)
    assert total.tolist() == [1.0, 2.0, 3.0]
    assert seen == {"strict": ["1", "2", "3"], "all": ["answer", "completion_ids", "difficulty"]}


def test_reward_set_construction_errors():
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardSet([])
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward functions"):
        RewardSet([_one, _index], weights=[1.0])
    with pytest.raises(TypeError, match="not callable"):
        RewardSet([42])
    with pytest.raises(ImportError, match="cannot import 'numeric_match'"):
        RewardSet(["numeric_match"])


def test_reward_set_resolves_import_paths_and_specs():
    rs = RewardSet(["lightning_rl.rewards.numeric_match",
                    {"class_path": "lightning_rl.rewards.RegexFormat", "init_args": {"pattern": "[0-9]+"}}])
    total, per_fn = rs(["p", "p"], ["7", "x"], {"answer": ["7", "7"]})
    assert rs.names == ["numeric_match", "regex_format"]
    assert per_fn.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert total.tolist() == [2.0, 0.0]


def test_reward_set_none_entry_says_it_could_not_be_stored_and_how_to_pass_it_again():
    with pytest.raises(TypeError, match=r"reward function #1 is None.*could not store \(a lambda.*"
                                        r"load_from_checkpoint\(path, reward_funcs=\[\.\.\.\]\)"):
        RewardSet([_one, None])


def test_numeric_match_reads_tensor_and_numpy_answers():
    np = pytest.importorskip("numpy")
    completions = ["it is 3", "it is 3", "2.5", "4", "3"]
    # what a plain DataLoader's default collate gives for an int column: a tensor, iterated as 0-d tensors
    answers = [torch.tensor(3), np.int64(3), torch.tensor(2.5, dtype=torch.float64), torch.tensor(5), np.array(3)]
    assert NumericMatch()(P3, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert NumericMatch()(P3, ["3", "x 7"], answer=torch.tensor([3, 5])) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is .5", 0.5),  # a leading-point decimal, not 5
        ("-.5", -0.5),
        ("The point is (1,2)", 2.0),  # two numbers, not 12
        ("x = 1,5", 5.0),  # a comma before fewer than 3 digits separates numbers (no decimal commas)
        ("1,2345", 2345.0),
        ("1,234,567.25 total", 1234567.25),
        ("The answer is \u22125", -5.0),  # U+2212 minus sign
        ("version 1.2.3", 1.2),  # no 0.3 out of ".3"
    ],
)
def test_extract_number_formats(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize(
    ("completion", "answer", "want"),
    [
        ("The answer is .5", "5", 0.0),
        ("The answer is .5", "0.5", 1.0),
        ("The point is (1,2)", "12", 0.0),
        ("x = 1,5 (European decimal)", "15", 0.0),
        ("It costs $5", "$5", 1.0),
        ("It is 5 km", "5 km", 1.0),
        ("The answer is 18", "Natalia sold 48/2 = 24 clips in May.\n#### 18", 1.0),
        ("The answer is 1,000", "#### 1,000", 1.0),
        ("The answer is 17", "Natalia sold 48/2 = 24 clips in May.\n#### 18", 0.0),
        ("The answer is \u22125", "-5", 1.0),
        ("The answer is -5", "\u22125", 1.0),
        ("about 1000", "1e3", 1.0),
    ],
)
def test_numeric_match_number_formats(completion, answer, want):
    assert NumericMatch()(["p"], [completion], answer=[answer]) == [want]


def test_numeric_match_ambiguous_answer_is_unscored_with_one_warning():
    fn = NumericMatch()
    with pytest.warns(UserWarning, match=r"cannot read one number from the 'answer' answer '3 or 4'.*'#### <number>'"):
        assert fn(P3, ["3", "4", "5"], answer=["3 or 4", "1/2", "5"]) == [None, None, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fn(P3, ["3"], answer=["n/a"]) == [None]  # warned once per NumericMatch


def test_reference_number():
    from lightning_rl.rewards.builtin import reference_number

    assert [reference_number(a) for a in (7, 2.5, "USD 12", "5%", " 42 ", "####", None, True)] == [
        7.0, 2.5, 12.0, 5.0, 42.0, None, None, None]


def test_length_penalty_leaves_out_the_final_eos():
    # what PolicyModule.score passes: the tokens up to and including the first EOS (id 2 here)
    ids = [[11, 12, 13, 14, 2], [11, 12, 13, 14], [11, 12, 13, 14, 15, 2], [2]]
    fn = LengthPenalty(target=4, coef=1.0, eos_token_ids=[2])
    assert fn(["p"] * 4, ["abcd", "abcd", "abcde", ""], completion_ids=ids) == [0.0, 0.0, -1.0, 0.0]
    assert LengthPenalty(target=4, coef=1.0)(["p"], ["abcd"], completion_ids=ids[:1]) == [-1.0]  # no EOS id given
    with pytest.raises(ValueError, match="target and coef"):
        LengthPenalty(target=-1, eos_token_ids=[2])


def test_length_penalty_with_eos_ids_survives_a_checkpoint():
    from lightning_rl.hparams import portable, resolve_callable

    spec = portable(LengthPenalty(target=3, coef=0.5, eos_token_ids=[2]))
    assert spec == {"class_path": "lightning_rl.rewards.builtin.LengthPenalty",
                    "init_args": {"target": 3, "coef": 0.5, "eos_token_ids": [2]}}
    assert resolve_callable(spec)(["p"], ["x"], completion_ids=[[5, 5, 5, 5, 2]]) == [-0.5]
