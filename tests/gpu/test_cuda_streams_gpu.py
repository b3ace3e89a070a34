"""The library's side streams: non-blocking driver streams that copy correctly and cost no pool of streams."""

import ctypes

import pytest
import torch

from lightning_rl.cuda_streams import side_stream
from lightning_rl.plugins.device_context import memory_outside_torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_side_streams_are_non_blocking_driver_streams_kept_per_name():
    device = torch.device("cuda", torch.cuda.current_device())
    stream = side_stream(device, "test a")
    assert isinstance(stream, torch.cuda.ExternalStream), "the driver call fell back to PyTorch's pool"
    assert side_stream(device, "test a") is stream
    assert side_stream(device, "test b").cuda_stream != stream.cuda_stream
    flags = ctypes.c_uint()
    assert ctypes.CDLL("libcuda.so.1").cuStreamGetFlags(ctypes.c_void_p(stream.cuda_stream), ctypes.byref(flags)) == 0
    assert flags.value == 1, "a blocking stream would wait for the default stream's work and never overlap it"


def test_copies_through_a_side_stream_arrive_whole_while_the_default_stream_computes():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    source = torch.randn(4096, 4096, device=device)
    expected = source.clone()
    stream = side_stream(device, "test copies")
    host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)
    source.record_stream(stream)
    busy = source @ source  # default-stream work beside the copy
    torch.cuda.current_stream(device).wait_stream(stream)
    back = host.to(device, non_blocking=True)
    torch.cuda.synchronize(device)
    assert torch.equal(back, expected)
    assert torch.isfinite(busy).all()


def test_making_side_streams_takes_no_device_memory_worth_counting():
    """PyTorch's first ``torch.cuda.Stream()`` fills a pool of streams: 70 MiB outside its allocator on an H200."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.empty(1, device=device)
    before = memory_outside_torch(device)
    streams = [side_stream(device, f"test memory {i}") for i in range(4)]
    torch.cuda.synchronize(device)
    after = memory_outside_torch(device)
    assert before is not None and after is not None, "NVML should list this process"
    print(f"four side streams: {(after - before) / 2**20:.1f} MiB outside PyTorch")
    assert after - before < 8 * 2**20
    assert len({s.cuda_stream for s in streams}) == 4
