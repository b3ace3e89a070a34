"""vLLM's front end in a process of its own (lightning_rl.rollout.front_end_process), with a stand-in engine."""

import os
import time
from pathlib import Path

import pytest
import torch

from lightning_rl.rollout import EngineSettings
from lightning_rl.rollout.front_end_process import (
    FrontEndError,
    PromptOutput,
    RemoteLLM,
    compact_outputs,
    resolve_factory,
)
from lightning_rl.rollout.vllm_outputs import rollout_from_outputs

FACTORY = "fake_front_end:start"
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _importable_fakes(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the spawned front end imports fake_front_end from here


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.1)
    return condition()


def test_compact_outputs_keep_what_a_rollout_reads():
    import fake_front_end

    raw = fake_front_end.FakeLLM().generate([{"prompt_token_ids": [5, 7]}], {"n": 2, "max_tokens": 3})
    compact = compact_outputs(raw)
    prompts = [[5, 7]]
    a, b = rollout_from_outputs(prompts, raw, 2, 0), rollout_from_outputs(prompts, compact, 2, 0)
    for field in ("prompt_ids", "completion_ids", "completion_mask", "sampling_logprobs", "group_index"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.finish_reasons == b.finish_reasons == ["stop", "length"]
    assert torch.allclose(b.sampling_logprobs[1], torch.tensor([-1.1, -1.2, -1.3]))  # the sampled tokens' own


def test_a_rollout_comes_back_from_the_front_end_process_in_one_message(tmp_path):
    marker = tmp_path / "shutdown.txt"
    llm = RemoteLLM({"marker": str(marker)}, factory=FACTORY)
    try:
        assert llm.process.is_alive() and llm.startup_time > 0
        prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [9]}]
        outputs = llm.generate(prompts, {"n": 3, "max_tokens": 4})
        assert all(isinstance(o, PromptOutput) for o in outputs)
        rollout = rollout_from_outputs([[1, 2, 3], [9]], outputs, 3, 0)
        assert rollout.completion_ids.tolist()[4] == [10, 11, 12, 13]  # prompt 2, completion 1: 9 + 1 + k
        assert rollout.finish_reasons == ["stop", "length", "length"] * 2
        assert torch.allclose(rollout.sampling_logprobs[0], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
        assert llm.last_engine_steps.steps == 5  # timed in the child: a prefill, then one step per token
        assert llm.collective_rpc("gc_freeze_count") > 1000  # its startup objects are out of the collector's walks
        # the calls a weight sync makes run in the front end's process
        [(method, args, pid)] = llm.collective_rpc("lightning_rl_load", args=(1, "x"))
        assert (method, args) == ("lightning_rl_load", (1, "x")) and pid == llm.process.pid != os.getpid()
        assert llm.reset_prefix_cache() is True
        with pytest.raises(FrontEndError, match=r"failed at collective_rpc: RuntimeError: the worker failed on \(7,\)"):
            llm.collective_rpc("fail", args=(7,))
        assert llm.generate(prompts[1:], {"n": 1, "max_tokens": 1})[0].outputs[0].token_ids == [9]  # still serving
    finally:
        llm.shutdown()
    assert marker.read_text() == f"shut down {llm.process.pid}"  # the engine was shut down in the child
    assert not llm.process.is_alive()
    llm.shutdown()  # idempotent
    with pytest.raises(FrontEndError, match="has exited"):
        llm.reset_prefix_cache()


def test_the_front_end_refuses_a_call_it_does_not_know_and_drops_answers_nobody_waits_for():
    from lightning_rl.rollout.front_end_process import CALLS

    llm = RemoteLLM({}, factory=FACTORY)
    try:
        with pytest.raises(FrontEndError, match="answers .*not 'sleep'"):
            llm._call("sleep")
        assert "sleep" not in CALLS
        # an answer nobody waited for (a call interrupted in the trainer) is not taken for the next call's
        llm._seq += 1
        llm._conn.send((llm._seq, "reset_prefix_cache", (), {}))
        [(method, _, _)] = llm.collective_rpc("after_an_interrupted_call")
        assert method == "after_an_interrupted_call"
    finally:
        llm.shutdown()


def test_a_failed_start_names_the_error_and_leaves_no_process():
    import multiprocessing

    with pytest.raises(FrontEndError, match="failed at start: ValueError: no such model: nope"):
        RemoteLLM({"fail_start": "nope"}, factory=FACTORY)
    assert not [p for p in multiprocessing.active_children() if p.name == "lightning-rl-vllm-front-end"]
    with pytest.raises(ValueError, match="module:function"):
        RemoteLLM({}, factory="fake_front_end.start")


def test_the_front_end_shuts_its_engine_down_when_the_trainers_end_of_the_pipe_closes(tmp_path):
    marker = tmp_path / "shutdown.txt"
    llm = RemoteLLM({"marker": str(marker)}, factory=FACTORY)
    llm._conn.close()  # as when the trainer's process ends without a shutdown
    assert _wait_for(lambda: not llm.process.is_alive()), "the front end outlived the trainer's end of the pipe"
    assert marker.read_text().startswith("shut down")


def test_the_factory_path_may_name_a_class_attribute():
    from lightning_rl.rollout.vllm_internals import VLLMInternals

    assert resolve_factory("lightning_rl.rollout.vllm_internals:VLLMInternals.start_in_own_process") == \
        VLLMInternals.start_in_own_process


def test_front_end_setting_is_checked():
    assert EngineSettings().front_end == "process"
    assert EngineSettings(front_end="trainer").front_end == "trainer"
    with pytest.raises(ValueError, match="front_end must be one of"):
        EngineSettings(front_end="thread")


def test_a_script_that_never_shuts_the_front_end_down_still_exits(tmp_path):
    """At the interpreter's exit the front end is stopped before multiprocessing waits for its children."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "shutdown.txt"
    script = tmp_path / "forgets.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from lightning_rl.rollout.front_end_process import RemoteLLM
        llm = RemoteLLM({{"marker": {str(marker)!r}}}, factory="fake_front_end:start")
        print("started", llm.process.pid, flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    pid = int(done.stdout.split()[-1])
    assert marker.read_text() == f"shut down {pid}"  # its engine was shut down, not left behind


def test_the_front_end_exits_without_leak_reports_from_its_frozen_objects(capfd, tmp_path):
    """The front end freezes its startup objects; left frozen at its exit, triton's bindings report leaks."""
    llm = RemoteLLM({"marker": str(tmp_path / "down.txt")}, factory=FACTORY)
    try:
        assert llm.collective_rpc("gc_freeze_count") > 1000
    finally:
        llm.shutdown()
    assert not llm.process.is_alive() and llm.process.exitcode == 0
    err = capfd.readouterr().err
    assert "leaked" not in err, err[-2000:]
