"""Several reward functions with weights, called safely: clear errors name the function and sample."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_rl.hparams import resolve_callable
from lightning_rl.rewards.validation import RewardError, reward_values, short_repr

RewardFn = Callable[..., Sequence[float | None]]


def reward_name(fn: RewardFn) -> str:
    """A readable name for a reward callable."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _accepts_all_kwargs(fn: RewardFn) -> tuple[bool, set[str]]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True, set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True, set()
    return False, {p.name for p in params}


def as_reward_list(funcs: Any) -> list[Any]:
    """``reward_funcs`` as a list: one function, import path or ``{"class_path", ...}`` spec alone is a list of one;
    None is an empty list.
    """
    if funcs is None:
        return []
    if callable(funcs) or isinstance(funcs, (str, Mapping)):
        return [funcs]
    return list(funcs)


class RewardSet:
    """Weighted sum of reward functions ``f(prompts, completions, **columns) -> list[float | None]``.

    ``None`` means "does not apply": it is left out of the weighted sum; a completion where every
    function returns ``None`` gets NaN, which the advantage functions leave out.

    Args:
        funcs: the reward callables (or their import paths / ``{"class_path", "init_args"}`` specs); one of them
            alone counts as a list of one.
        weights: one weight per function (default 1.0 each).
    """

    def __init__(self, funcs: Sequence[RewardFn | str | Mapping[str, Any]] | RewardFn | str | Mapping[str, Any],
                 weights: Sequence[float] | None = None):
        funcs = as_reward_list(funcs)
        for i, f in enumerate(funcs):
            if f is None:
                raise TypeError(
                    f"reward function #{i} is None, which is what a checkpoint holds for a reward function it could "
                    "not store (a lambda, a function defined inside another, or an object without an import path): "
                    "pass the reward functions again, all of them in the same order, e.g. "
                    "GRPO.load_from_checkpoint(path, reward_funcs=[...])"
                )
        funcs = [resolve_callable(f) for f in funcs or []]
        if not funcs:
            raise ValueError("at least one reward function is needed (reward_funcs=[...])")
        for i, f in enumerate(funcs):
            if not callable(f):
                raise TypeError(f"reward function #{i} ({f!r}) is not callable: give a function "
                                "f(prompts, completions, **columns), its import path, or a class_path spec")
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(funcs)} reward functions; give one each"
            )
        self.funcs = list(funcs)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(funcs)
        bad = [(i, w) for i, w in enumerate(self.weights) if not math.isfinite(w)]
        if bad:
            raise ValueError(f"reward_weights[{bad[0][0]}] is {bad[0][1]}: each weight must be a finite number "
                             "(0 turns a function off; leave reward_weights out for 1.0 each)")
        self.names = _unique([reward_name(f) for f in funcs])

    def _call_one(self, fn: RewardFn, name: str, prompts, completions, columns) -> list[float | None]:
        takes_all, accepted = _accepts_all_kwargs(fn)
        kwargs = columns if takes_all else {k: v for k, v in columns.items() if k in accepted}
        try:
            values = fn(prompts, completions, **kwargs)
        except Exception as err:
            raise RewardError(self._locate_failure(fn, name, prompts, completions, kwargs, err)) from err
        return reward_values(values, name, len(completions))

    @staticmethod
    def _locate_failure(fn, name, prompts, completions, kwargs, err) -> str:
        """Re-run sample by sample to name the first one that makes ``fn`` raise."""
        for i in range(len(completions)):
            one = {k: list(v)[i : i + 1] if isinstance(v, Sequence) and not isinstance(v, str) else v
                   for k, v in kwargs.items()}
            try:
                fn(prompts[i : i + 1], completions[i : i + 1], **one)
            except Exception as one_err:
                return (
                    f"reward function {name!r} raised {type(one_err).__name__}: {one_err} on sample {i} "
                    f"(prompt={short_repr(prompts[i])}, completion={short_repr(completions[i])}); fix the function or "
                    "return None for samples it cannot score"
                )
        return f"reward function {name!r} raised {type(err).__name__}: {err} on the batch of {len(completions)}"

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch.

        Returns:
            ``(total [N], per_function [N, F])`` float32 tensors; NaN marks ``None``.
        """
        per_fn = torch.full((len(completions), len(self.funcs)), math.nan)
        for j, (fn, name) in enumerate(zip(self.funcs, self.names)):
            vals = self._call_one(fn, name, prompts, completions, dict(columns))
            per_fn[:, j] = torch.tensor([math.nan if v is None else v for v in vals])
            if torch.isinf(per_fn[:, j]).any():
                raise RewardError(f"reward function {name!r} returned an infinite value; rewards must be finite")
        weights = torch.tensor(self.weights)
        weighted = per_fn * weights
        total = torch.where(torch.isnan(weighted), torch.zeros_like(weighted), weighted).sum(-1)
        total[torch.isnan(per_fn).all(-1)] = math.nan
        return total, per_fn


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
