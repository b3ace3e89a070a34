"""side_stream's choices without a GPU: the driver's stream when it makes one, PyTorch's pool when it cannot."""

import contextlib
import ctypes

import pytest
import torch

from lightning_rl import cuda_streams


class _Driver:
    """A stand-in for ``libcuda``: a current context, and ``cuStreamCreate`` answering ``result``."""

    def __init__(self, result: int) -> None:
        self.result = result
        self.created = 0

    def cuCtxGetCurrent(self, context):  # noqa: N802 (the driver's name)
        ctypes.cast(context, ctypes.POINTER(ctypes.c_void_p))[0] = 0x1234
        return 0

    def cuStreamCreate(self, handle, flags):  # noqa: N802
        assert flags == 1, "side streams must not block on the default stream"
        self.created += 1
        ctypes.cast(handle, ctypes.POINTER(ctypes.c_void_p))[0] = 0x5000 + self.created
        return self.result


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's device guard, synchronize, pool and external streams, recorded instead of run."""
    made = []
    monkeypatch.setattr(cuda_streams, "_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda index: made.append(("pool", index)) or ("pool", index))
    monkeypatch.setattr(torch.cuda, "ExternalStream",
                        lambda ptr, device: made.append(("driver", ptr)) or ("driver", ptr, device.index))
    return made


def test_a_driver_stream_is_made_once_per_device_and_name(monkeypatch, fake_cuda):
    driver = _Driver(result=0)
    monkeypatch.setattr(cuda_streams, "cuda_driver", lambda: driver)
    first = cuda_streams.side_stream(torch.device("cuda", 0), "a")
    assert first == ("driver", 0x5001, 0)
    assert cuda_streams.side_stream("cuda:0", "a") is first
    assert cuda_streams.side_stream(0, "b") == ("driver", 0x5002, 0)
    assert driver.created == 2


@pytest.mark.parametrize("driver", [None, _Driver(result=2)], ids=["no libcuda", "cuStreamCreate fails"])
def test_without_a_driver_stream_the_pool_serves(monkeypatch, fake_cuda, driver):
    monkeypatch.setattr(cuda_streams, "cuda_driver", lambda: driver)
    assert cuda_streams.side_stream(torch.device("cuda", 1), "a") == ("pool", 1)
    assert cuda_streams.side_stream(torch.device("cuda", 1), "a") == ("pool", 1)
    assert fake_cuda == [("pool", 1)]
