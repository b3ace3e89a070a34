"""Built-in reward functions: numeric answer match, regex format, length penalty.

A reward function is any callable ``f(prompts, completions, **columns) -> list[float | None]``:
one value per completion, ``None`` where it does not apply. ``columns`` holds the dataset's other
columns (repeated for each completion) and ``completion_ids``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from lightning_rl.rewards.validation import short_repr

# A number: an optional minus, then digits with thousands separators in whole groups of three ("1,234,567"), or
# plain digits, either with an optional decimal part; or a decimal part alone (".5"). A comma not followed by exactly
# three digits separates two numbers ("1,5" and "(1,2)" are 1 and then 5 or 2, never 15 or 12): decimal commas are not
# read. Unless it has a minus, a number never starts right after a digit or a point: "1.2.3" gives 1.2, never a 0.3.
_NUMBER = re.compile(r"(?:-|(?<![\d.]))(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})  # minus sign, small and full-width
_FINAL_ANSWER = "####"  # GSM8K's answers end with "#### <number>"


def _parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _numbers(text: str) -> list[str]:
    """The numbers written in ``text``, as matched (Unicode minus signs read as ``-``)."""
    return _NUMBER.findall(text.translate(_MINUS_SIGNS))


def reference_number(answer: Any) -> float | None:
    """The number a reference answer holds, or None when it holds none or several (it is then ambiguous).

    An int or float is itself. Text is read as a plain number first (``"3.14"``, ``"-5"``, ``"1e3"``); else, after
    GSM8K's ``####`` final-answer mark when it has one, as its single number with anything around it (``"$5"``,
    ``"5 km"``, ``"1,000 apples"``, ``"... #### 18"``). Text with several numbers (``"3 or 4"``, ``"1/2"``) or none
    (``"n/a"``) gives None.
    """
    answer = _plain_value(answer)
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return float(answer)
    text = str(answer).translate(_MINUS_SIGNS).strip()
    if _FINAL_ANSWER in text:
        text = text.rsplit(_FINAL_ANSWER, 1)[1].strip()
    try:
        return float(text)
    except ValueError:
        pass
    found = _numbers(text)
    return _parse_number(found[0]) if len(found) == 1 else None


def _plain_value(answer: Any) -> Any:
    """A column value as plain Python: a 0-d tensor or numpy scalar (what a default collate gives) via ``.item()``."""
    item = getattr(answer, "item", None)
    if callable(item) and getattr(answer, "ndim", None) == 0:
        return item()
    return answer


def extract_number(text: str, position: Literal["first", "last"] = "last") -> float | None:
    """The first or last number written in ``text``, or None.

    ``1,234``, ``-5.5``, ``.5`` and ``−5`` (a Unicode minus) are numbers. A comma is a thousands separator only
    before a whole group of three digits: ``1,5`` and ``(1,2)`` are two numbers each (decimal commas are not read).
    """
    found = _numbers(text)
    if not found:
        return None
    return _parse_number(found[0] if position == "first" else found[-1])


class NumericMatch:
    """1.0 when the number in the completion equals the reference answer, else 0.0.

    The completion's number is read by :func:`extract_number`, the reference's by :func:`reference_number`:
    a plain number, GSM8K's ``"... #### 18"``, or text with a single number (``"$5"``, ``"5 km"``). A reference
    with no number or several gives None (the completion is not scored) and a warning, once, that names it.

    Args:
        column: dataset column holding the reference answer.
        position: read the ``"first"`` or ``"last"`` number of the completion.
        tolerance: absolute tolerance of the comparison.
    """

    def __init__(self, column: str = "answer", position: Literal["first", "last"] = "last", tolerance: float = 1e-6):
        if position not in ("first", "last"):
            raise ValueError(f"position must be 'first' or 'last', got {position!r}")
        self.column = column
        self.position = position
        self.tolerance = tolerance
        self.__name__ = "numeric_match"
        self._warned = False

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float | None]:
        """Score each completion against ``columns[self.column]``."""
        if self.column not in columns:
            raise KeyError(
                f"numeric_match needs the dataset column {self.column!r}; columns present: {sorted(columns)}"
            )
        out: list[float | None] = []
        for completion, answer in zip(completions, columns[self.column], strict=True):
            want = reference_number(answer)
            if want is None:
                self._warn_unreadable(answer)
                out.append(None)
                continue
            got = extract_number(completion, self.position)
            out.append(float(got is not None and math.isclose(got, want, abs_tol=self.tolerance)))
        return out

    def _warn_unreadable(self, answer: Any) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"numeric_match cannot read one number from the {self.column!r} answer {short_repr(_plain_value(answer))} "
            "(it holds no number or several), so completions of such rows get None (unscored); make the column hold "
            "the answer's number alone, or end it with '#### <number>' as GSM8K does (warned once)",
            stacklevel=3,
        )


numeric_match = NumericMatch()


class RegexFormat:
    """``reward`` when the completion matches ``pattern`` (``re.fullmatch`` or ``re.search``), else 0.

    Args:
        pattern: regular expression.
        full: require the whole (stripped) completion to match.
        reward: value given on a match.
    """

    def __init__(self, pattern: str, full: bool = True, reward: float = 1.0):
        self.pattern = pattern
        self.regex = re.compile(pattern, re.DOTALL)
        self.full = full
        self.reward = reward
        self.__name__ = "regex_format"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        """Score each completion by whether it matches."""
        match = self.regex.fullmatch if self.full else self.regex.search
        return [self.reward if match(c.strip() if self.full else c) else 0.0 for c in completions]


class LengthPenalty:
    """``-coef * max(0, length - target)``: discourages completions longer than ``target``.

    Length counts tokens when ``completion_ids`` is given (the modules pass it), else characters. The EOS
    token that ends a completion is not counted when it is among ``eos_token_ids``; a completion of
    ``target`` tokens then costs nothing whether it stopped with EOS or was cut at the length limit.

    Args:
        target: free length.
        coef: penalty per unit over the target.
        eos_token_ids: token ids that end a completion (e.g. ``[tokenizer.eos_token_id]``), not counted when
            they are the last of ``completion_ids``.
    """

    def __init__(self, target: int = 32, coef: float = 0.01, eos_token_ids: Sequence[int] | None = None):
        if target < 0 or coef < 0:
            raise ValueError(f"target and coef must be >= 0, got target={target}, coef={coef}")
        self.target = target
        self.coef = coef
        self.eos_token_ids = None if eos_token_ids is None else [int(t) for t in eos_token_ids]
        self.__name__ = "length_penalty"

    def _token_count(self, ids: Sequence[int]) -> int:
        ids = list(ids)
        ends = bool(ids) and self.eos_token_ids is not None and int(ids[-1]) in self.eos_token_ids
        return len(ids) - ends

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        """Penalize each completion's excess length."""
        ids = columns.get("completion_ids")
        lengths = [self._token_count(x) for x in ids] if ids is not None else [len(c) for c in completions]
        return [-self.coef * max(0, n - self.target) for n in lengths]
