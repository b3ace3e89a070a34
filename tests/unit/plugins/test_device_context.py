"""NVML figures of this process and its descendants, with a stand-in NVML (no GPU on the CPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lightning_rl.plugins import device_context

MiB = 2**20


class _NVMLError(Exception):
    pass


def _fake_nvml(monkeypatch, processes: dict[int, int] | None, init_fails: bool = False) -> None:
    """Install a stand-in ``pynvml`` whose only device lists ``processes`` (pid -> bytes)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError

    def init():
        if init_fails:
            raise _NVMLError("driver not loaded")

    def handle_by_uuid(uuid):
        if uuid != "GPU-abc":
            raise _NVMLError("not found")
        return "handle"

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = handle_by_uuid
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in (processes or {}).items()]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="abc"))


@pytest.fixture
def child():
    """A child process of this one, as an engine process would be."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_the_process_tree_holds_this_process_and_its_children(child):
    pids = device_context.process_tree_pids()
    assert os.getpid() in pids and child in pids
    assert os.getppid() not in pids


def test_nvml_figures_count_only_the_named_processes(monkeypatch, child):
    cuda = torch.device("cuda", 0)
    stranger = os.getppid()  # another job on the same GPU
    _fake_nvml(monkeypatch, {os.getpid(): 900 * MiB, child: 2000 * MiB, stranger: 5000 * MiB})
    assert device_context.nvml_used_by(cuda, {os.getpid()}) == 900 * MiB
    assert device_context.process_tree_used_bytes(cuda) == 2900 * MiB  # the stranger's 5000 MiB left out
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 600 * MiB)
    assert device_context.memory_outside_torch(cuda) == 300 * MiB


@pytest.mark.parametrize("case", ["not listed", "no driver", "other device", "no pynvml"])
def test_nvml_figures_are_none_when_nvml_cannot_say(monkeypatch, case):
    cuda = torch.device("cuda", 0)
    if case == "no pynvml":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    else:
        _fake_nvml(monkeypatch, {os.getppid(): MiB} if case == "not listed" else {os.getpid(): MiB},
                   init_fails=case == "no driver")
        if case == "other device":
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="zzz"))
    assert device_context.nvml_used_by(cuda, {os.getpid()}) is None
    assert device_context.process_tree_used_bytes(cuda) is None
    assert device_context.memory_outside_torch(cuda) is None
