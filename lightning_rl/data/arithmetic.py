"""A built-in arithmetic task, deterministic by seed, with disjoint train and held-out splits."""

from __future__ import annotations

import itertools
import random
from typing import Any

from lightning_rl.data.prompts import PromptDataModule

DEFAULT_TEMPLATE = "What is {a} {op} {b}? Answer with just the number."
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_splits(
    num_train: int,
    num_val: int,
    min_operand: int = 0,
    max_operand: int = 9,
    ops: tuple[str, ...] = ("+",),
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    chat: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train and held-out rows ``{"prompt", "answer", "question"}`` of ``a op b``.

    Args:
        num_train: training problems.
        num_val: held-out problems (never in the training split).
        min_operand: smallest operand.
        max_operand: largest operand.
        ops: operators among ``+``, ``-``, ``*``.
        seed: the same seed gives the same splits.
        template: prompt text with ``{a}``, ``{op}``, ``{b}``.
        chat: give prompts as chat messages (one user turn) instead of plain text.
    """
    bad = [o for o in ops if o not in _OPS]
    if bad:
        raise ValueError(f"unsupported operators {bad}; choose from {sorted(_OPS)}")
    if max_operand < min_operand:
        raise ValueError(f"max_operand ({max_operand}) must be >= min_operand ({min_operand})")
    problems = list(itertools.product(range(min_operand, max_operand + 1), ops, range(min_operand, max_operand + 1)))
    if num_train + num_val > len(problems):
        raise ValueError(
            f"only {len(problems)} distinct problems exist for operands {min_operand}..{max_operand} and ops "
            f"{list(ops)}; ask for fewer than num_train + num_val = {num_train + num_val} or widen the range"
        )
    random.Random(seed).shuffle(problems)

    def row(a: int, op: str, b: int) -> dict[str, Any]:
        question = template.format(a=a, op=op, b=b)
        prompt: Any = [{"role": "user", "content": question}] if chat else question
        return {"prompt": prompt, "answer": str(_OPS[op](a, b)), "question": question}

    rows = [row(*p) for p in problems[: num_train + num_val]]
    return rows[num_val:], rows[:num_val]


class ArithmeticDataModule(PromptDataModule):
    """:class:`PromptDataModule` over :func:`arithmetic_splits` (column ``answer`` for the rewards).

    Args:
        num_train: training problems.
        num_val: held-out problems.
        min_operand: smallest operand.
        max_operand: largest operand.
        ops: operators among ``+``, ``-``, ``*``.
        seed: split seed.
        template: prompt text with ``{a}``, ``{op}``, ``{b}``.
        chat: chat-message prompts instead of plain text.
        batch_size: prompts per training step.
        val_batch_size: prompts per validation batch.
        shuffle: shuffle training prompts.
    """

    def __init__(
        self,
        num_train: int = 70,
        num_val: int = 30,
        min_operand: int = 0,
        max_operand: int = 9,
        ops: tuple[str, ...] = ("+",),
        seed: int = 0,
        template: str = DEFAULT_TEMPLATE,
        chat: bool = True,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if num_train < 1 or num_val < 0:
            raise ValueError(f"num_train must be >= 1 and num_val >= 0, got num_train={num_train} and "
                             f"num_val={num_val}: the training split needs rows (num_val=0 leaves out validation)")
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, shuffle=shuffle)
        self.train_split, self.val_split = arithmetic_splits(
            num_train, num_val, min_operand, max_operand, tuple(ops), seed, template, chat
        )

    def load_train_rows(self):
        """The generated training split."""
        return self.train_split

    def load_val_rows(self):
        """The generated held-out split."""
        return self.val_split or None
