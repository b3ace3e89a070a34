"""How a rollout's engine steps went: how many, and how long each took, as the front end received them.

vLLM's front end (``vllm.LLM.generate``) calls ``llm_engine.step()`` until every request is done; each call returns
one engine-core iteration's outputs (a prefill, or one decode token for every running sequence). Timing those calls
says whether a slow rollout decoded slowly all along (every step slower: the host or the GPU beside it) or stalled
(a few long steps), and whether it took more steps than its longest completion (sequences preempted and
recomputed). :class:`StepClock` times them, and the garbage collections of the process that receives them (a
full collection pauses that loop while the engine core decodes on); the rollout's ``extras`` carry
:meth:`EngineSteps.as_extras`, and :class:`~lightning_rl.callbacks.VLLMRollout` logs them as ``rollout/engine_*``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: The ``Rollout.extras`` keys :meth:`EngineSteps.as_extras` writes.
EXTRAS_KEYS = ("engine_steps", "engine_first_step_s", "engine_step_ms", "engine_step_p90_ms", "engine_step_max_ms",
               "engine_gc_s")
_CLOCK = "_lightning_rl_step_clock"


@dataclass(frozen=True)
class EngineSteps:
    """One ``generate`` call's engine steps.

    Args:
        steps: ``llm_engine.step()`` calls.
        first_step_s: seconds from the call's start to the first step's outputs (the prompts' prefill).
        step_ms: median milliseconds between consecutive steps' outputs.
        step_p90_ms: their 90th percentile.
        step_max_ms: the longest.
        gc_s: seconds the receiving process spent in garbage collections during the call.
    """

    steps: int
    first_step_s: float
    step_ms: float
    step_p90_ms: float
    step_max_ms: float
    gc_s: float = 0.0

    def as_extras(self) -> dict[str, float]:
        """The fields under :data:`EXTRAS_KEYS`."""
        return dict(zip(EXTRAS_KEYS, (float(self.steps), self.first_step_s, self.step_ms, self.step_p90_ms,
                                      self.step_max_ms, self.gc_s), strict=True))


def engine_steps_from(start: float, ends: Sequence[float], gc_s: float = 0.0) -> EngineSteps | None:
    """:class:`EngineSteps` of a call that started at ``start`` and whose steps ended at ``ends`` (None: no step)."""
    if not ends:
        return None
    gaps = [(b - a) * 1e3 for a, b in zip(ends, ends[1:], strict=False)] or [0.0]
    ordered = sorted(gaps)
    return EngineSteps(steps=len(ends), first_step_s=ends[0] - start, step_ms=statistics.median(gaps),
                       step_p90_ms=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], step_max_ms=ordered[-1],
                       gc_s=gc_s)


class StepClock:
    """Times the engine steps of the calls :meth:`run` makes on a ``vllm.LLM`` (wraps its ``llm_engine.step``).

    A front end in another process (:class:`~lightning_rl.rollout.front_end_process.RemoteLLM`) times its steps
    itself and keeps the last call's :class:`EngineSteps` as ``last_engine_steps``; the clock reads that instead.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._ends: list[float] | None = None
        engine = getattr(llm, "llm_engine", None)
        self.wraps = engine is not None and callable(getattr(engine, "step", None))
        if self.wraps:
            step = engine.step

            def timed_step(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                if self._ends is not None:
                    self._ends.append(time.perf_counter())
                return out

            engine.step = timed_step

    def run(self, call: Callable[[], T]) -> tuple[T, EngineSteps | None]:
        """``call()`` and its engine steps (None when they could not be timed)."""
        if not self.wraps:
            out = call()
            return out, getattr(self.llm, "last_engine_steps", None)
        self._ends = []
        collections = _CollectionTime()
        gc.callbacks.append(collections)
        start = time.perf_counter()
        try:
            out = call()
        finally:
            gc.callbacks.remove(collections)
            ends, self._ends = self._ends, None
        return out, engine_steps_from(start, ends, collections.total)


class _CollectionTime:
    """A ``gc.callbacks`` entry that adds up the time of the collections it sees."""

    def __init__(self) -> None:
        self.total = 0.0
        self._began: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.total += time.perf_counter() - self._began
            self._began = None


def engine_step_timings(rollout: Any) -> dict[str, float]:
    """The :data:`EXTRAS_KEYS` a rollout's ``extras`` hold (none for an engine that does not time its steps)."""
    extras = getattr(rollout, "extras", None) or {}
    return {k: float(extras[k]) for k in EXTRAS_KEYS if k in extras}


def step_clock(llm: Any) -> StepClock:
    """``llm``'s :class:`StepClock` (made once per engine, kept on it)."""
    clock = getattr(llm, _CLOCK, None)
    if clock is None:
        clock = StepClock(llm)
        setattr(llm, _CLOCK, clock)
    return clock


__all__ = ["EXTRAS_KEYS", "EngineSteps", "StepClock", "engine_step_timings", "engine_steps_from",
           "step_clock"]
