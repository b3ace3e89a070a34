"""Built-in reward functions: numeric answer match, regex format, length penalty.

A reward function is any callable ``f(prompts, completions, **columns) -> list[float | None]``:
one value per completion, ``None`` where it does not apply. ``columns`` holds the dataset's other
columns (repeated for each completion) and ``completion_ids``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _plain_value(answer: Any) -> Any:
    """A column value as plain Python: a 0-d tensor or numpy scalar (what a default collate gives) via ``.item()``."""
    item = getattr(answer, "item", None)
    if callable(item) and getattr(answer, "ndim", None) == 0:
        return item()
    return answer


def extract_number(text: str, position: Literal["first", "last"] = "last") -> float | None:
    """The first or last number written in ``text`` (``1,234`` and ``-5.5`` included), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return _parse_number(found[0] if position == "first" else found[-1])


class NumericMatch:
    """1.0 when the number in the completion equals the reference answer, else 0.0.

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

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float | None]:
        """Score each completion against ``columns[self.column]``."""
        if self.column not in columns:
            raise KeyError(
                f"numeric_match needs the dataset column {self.column!r}; columns present: {sorted(columns)}"
            )
        out: list[float | None] = []
        for completion, answer in zip(completions, columns[self.column], strict=True):
            want = _parse_number(str(_plain_value(answer)))
            if want is None:
                out.append(None)
                continue
            got = extract_number(completion, self.position)
            out.append(float(got is not None and math.isclose(got, want, abs_tol=self.tolerance)))
        return out


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

    Length counts tokens when ``completion_ids`` is given (the modules pass it), else characters.

    Args:
        target: free length.
        coef: penalty per unit over the target.
    """

    def __init__(self, target: int = 32, coef: float = 0.01):
        if target < 0 or coef < 0:
            raise ValueError(f"target and coef must be >= 0, got target={target}, coef={coef}")
        self.target = target
        self.coef = coef
        self.__name__ = "length_penalty"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        """Penalize each completion's excess length."""
        ids = columns.get("completion_ids")
        lengths = [len(x) for x in ids] if ids is not None else [len(c) for c in completions]
        return [-self.coef * max(0, n - self.target) for n in lengths]
