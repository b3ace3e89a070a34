"""The engine process's stream replacement: only where the library launched an engine, and only for new streams."""

import contextlib
import os
import sys
import types

import pytest
import torch

from lightning_rl.rollout import engine_streams


class _FakeStream:
    """Stands in for ``torch.cuda.Stream`` (a CPU build cannot make one): records how each stream was asked for."""

    def __new__(cls, device=None, priority=0, **kwargs):
        out = object.__new__(cls)
        out.asked = {"device": device, "priority": priority, **kwargs}
        return out


@pytest.fixture
def fake_streams(monkeypatch):
    """torch.cuda.Stream replaced by the fake (restored after), a driver that answers 0x77, device 3 current."""
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(engine_streams, "device_index", lambda device: 3 if device is None else int(device))
    monkeypatch.setattr(engine_streams, "driver_stream_pointer", lambda index: 0x77)
    monkeypatch.setattr(engine_streams, "_COUNTS", {"driver": 0, "pool": 0})


def test_new_streams_come_from_the_driver_and_wrappers_pass_through(fake_streams, monkeypatch):
    engine_streams.install_driver_streams()
    engine_streams.install_driver_streams()  # idempotent: no subclass of the subclass
    stream_class = torch.cuda.Stream
    assert stream_class.__bases__ == (_FakeStream,)
    assert stream_class().asked == {"device": None, "priority": 0, "stream_ptr": 0x77}
    assert stream_class(device=1).asked == {"device": None, "priority": 0, "stream_ptr": 0x77}
    # what torch.cuda.current_stream() does, and a priority only the pool serves: PyTorch's own
    assert stream_class(stream_id=5, device_index=0, device_type=1).asked == {
        "device": None, "priority": 0, "stream_id": 5, "device_index": 0, "device_type": 1}
    assert stream_class(priority=-1).asked == {"device": None, "priority": -1}
    assert isinstance(stream_class(), _FakeStream)
    monkeypatch.setattr(engine_streams, "driver_stream_pointer", lambda index: None)
    assert stream_class().asked == {"device": 3, "priority": 0}  # the driver failed: the pool serves
    assert engine_streams.streams_made() == {"driver": 3, "pool": 1}


@pytest.mark.parametrize("launcher", [None, "self", "other"])
def test_only_an_engine_the_library_launched_changes_its_streams(fake_streams, monkeypatch, launcher):
    if launcher is None:
        monkeypatch.delenv(engine_streams.ENGINE_STREAMS_ENV, raising=False)
    else:
        pid = os.getpid() if launcher == "self" else os.getpid() + 1
        monkeypatch.setenv(engine_streams.ENGINE_STREAMS_ENV, str(pid))
    assert engine_streams.install_in_launched_engine() is (launcher == "other")
    assert (torch.cuda.Stream is _FakeStream) is (launcher != "other")


def test_the_launcher_spawns_its_engine_with_itself_named(monkeypatch):
    """``start_in_own_process`` sets the variable while vLLM spawns the engine core, then puts it back."""
    from lightning_rl.rollout.vllm_internals import VLLMInternals

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["env"] = os.environ.get(engine_streams.ENGINE_STREAMS_ENV)
            seen["multiprocessing"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    monkeypatch.delenv(engine_streams.ENGINE_STREAMS_ENV, raising=False)
    VLLMInternals.start_in_own_process({"model": "m"})
    assert seen == {"env": str(os.getpid()), "multiprocessing": "1"}
    assert engine_streams.ENGINE_STREAMS_ENV not in os.environ
