"""Engine step timing (lightning_rl.rollout.engine_steps) with a fake clock and a fake ``vllm.LLM``."""

import gc
from types import SimpleNamespace

import pytest

from lightning_rl.rollout import engine_steps
from lightning_rl.rollout.engine_steps import EngineSteps, engine_step_timings, engine_steps_from, step_clock


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(engine_steps.time, "perf_counter", fake)
    return fake


def test_summary_of_step_times():
    ends = [10.5, 10.502, 10.504, 10.507, 10.6]  # prefill 0.5 s, then 2, 2, 3 and a 93 ms stall
    steps = engine_steps_from(10.0, ends)
    assert steps.steps == 5 and steps.first_step_s == pytest.approx(0.5)
    assert steps.step_ms == pytest.approx(2.5) and steps.step_max_ms == pytest.approx(93.0)
    assert steps.step_p90_ms == pytest.approx(93.0)
    assert engine_steps_from(1.0, []) is None
    one = engine_steps_from(1.0, [1.25])
    assert (one.steps, one.first_step_s, one.step_ms, one.step_max_ms) == (1, 0.25, 0.0, 0.0)


def test_the_clock_times_each_engine_step_of_a_call_and_only_while_it_runs(clock):
    def step():
        clock.now += 0.004
        return []

    llm = SimpleNamespace(llm_engine=SimpleNamespace(step=step))

    def generate(tokens):
        clock.now += 0.1  # adding the requests
        for k in range(tokens + 1):
            if k == 2:
                clock.now += 0.05  # one slow step
            llm.llm_engine.step()
        return "outputs"

    assert step_clock(llm) is step_clock(llm)  # one clock per engine: the step is wrapped once
    out, steps = step_clock(llm).run(lambda: generate(4))
    assert out == "outputs"
    assert steps.steps == 5 and steps.first_step_s == pytest.approx(0.104)
    assert steps.step_ms == pytest.approx(4.0) and steps.step_max_ms == pytest.approx(54.0)
    llm.llm_engine.step()  # outside a call: not recorded
    _, steps = step_clock(llm).run(lambda: generate(1))
    assert steps.steps == 2


def test_a_remote_front_end_reports_its_own_steps_and_a_failing_call_leaves_the_clock_idle(clock):
    remote = SimpleNamespace(last_engine_steps=EngineSteps(7, 0.1, 3.0, 4.0, 9.0))
    assert step_clock(remote).run(lambda: 1) == (1, remote.last_engine_steps)

    def boom():
        raise RuntimeError("prompt too long")

    llm = SimpleNamespace(llm_engine=SimpleNamespace(step=lambda: []))
    with pytest.raises(RuntimeError, match="prompt too long"):
        step_clock(llm).run(boom)
    assert step_clock(llm)._ends is None


def test_the_receiving_processs_collections_during_the_call_are_timed():
    class Cycle:
        def __init__(self):
            self.me = self

    def generate():
        for _ in range(1000):
            Cycle()
        llm.llm_engine.step()
        gc.collect()  # a full collection while the engine's outputs wait
        llm.llm_engine.step()
        return "outputs"

    llm = SimpleNamespace(llm_engine=SimpleNamespace(step=lambda: []))
    callbacks = list(gc.callbacks)
    _, steps = step_clock(llm).run(generate)
    assert steps.steps == 2 and steps.gc_s > 0
    assert gc.callbacks == callbacks  # the timer is gone after the call
    _, steps = step_clock(llm).run(lambda: llm.llm_engine.step())
    assert steps.gc_s < 0.05  # only what happened during that call (a young collection at most)


def test_rollout_extras_give_the_callback_its_timings():
    steps = EngineSteps(129, 0.02, 3.5, 4.1, 12.0, 0.3)
    rollout = SimpleNamespace(extras={"engine": "vllm", **steps.as_extras()})
    assert engine_step_timings(rollout) == {"engine_steps": 129.0, "engine_first_step_s": 0.02,
                                            "engine_step_ms": 3.5, "engine_step_p90_ms": 4.1,
                                            "engine_step_max_ms": 12.0, "engine_gc_s": 0.3}
    assert engine_step_timings(SimpleNamespace(extras={})) == {}
