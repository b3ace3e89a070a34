"""The private CUDA MPS daemon of VLLMRollout, against a stand-in for ``nvidia-cuda-mps-control`` on PATH.

The stand-in logs each call (``-d`` and the commands it reads) and answers ``get_server_list`` and
``get_client_list`` from files in its pipe folder; the CUDA client probe (which needs a GPU) is replaced.
"""

import os
import subprocess
import sys
import textwrap
import time
import types

import pytest

from lightning_rl.callbacks.vllm_rollout import VLLMRollout
from lightning_rl.rollout import cuda_mps

MPS_KEYS = (cuda_mps.PIPE_ENV, cuda_mps.LOG_ENV, cuda_mps.PRIORITY_ENV, cuda_mps.ENGINE_PRIORITY_ENV)

FAKE_CONTROL = """#!/bin/bash
log="$FAKE_MPS_LOG"
if [ "$1" = "-d" ]; then
  [ -d "$CUDA_MPS_PIPE_DIRECTORY" ] && [ -d "$CUDA_MPS_LOG_DIRECTORY" ] || exit 5
  echo "start $CUDA_MPS_PIPE_DIRECTORY" >> "$log"
  [ -n "$FAKE_MPS_START_RC" ] && { echo "cannot start: $FAKE_MPS_START_RC" >&2; exit "$FAKE_MPS_START_RC"; }
  # a daemon: it outlives this call, holding the output it was given (as a careless one would)
  ( sleep 60 ) &
  exit 0
fi
while read -r cmd arg; do
  echo "$cmd $arg" >> "$log"
  case "$cmd" in
    get_server_list) cat "$CUDA_MPS_PIPE_DIRECTORY/servers" 2>/dev/null ;;
    get_client_list) [ -n "$FAKE_MPS_NO_CLIENT_LIST" ] && exit 1; cat "$CUDA_MPS_PIPE_DIRECTORY/clients" 2>/dev/null ;;
  esac
done
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    """A stand-in control binary first on PATH, a passing client probe, and this process's daemon reset after."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(FAKE_CONTROL)
    control.chmod(0o755)
    log = tmp_path / "mps.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.setattr(cuda_mps, "probe_client", lambda env: None)
    monkeypatch.setattr(sys, "platform", "linux")
    for key in MPS_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield log
    cuda_mps._DAEMON = None
    for key in MPS_KEYS:
        os.environ.pop(key, None)


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_without_the_control_binary_nothing_starts_and_mps_true_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(cuda_mps.PIPE_ENV, raising=False)
    rollout = VLLMRollout(mps=None)
    assert "nvidia-cuda-mps-control is not on PATH" in rollout.mps_off_reason
    assert cuda_mps.PIPE_ENV not in os.environ
    with pytest.raises(ValueError, match=r"mps=True\) is impossible here: nvidia-cuda-mps-control is not on PATH"):
        VLLMRollout(mps=True)


def test_the_default_starts_no_daemon(fake_control):
    rollout = VLLMRollout()
    assert rollout.mps_off_reason == "mps=False" and not rollout.using_mps
    assert calls(fake_control) == [] and cuda_mps.PIPE_ENV not in os.environ


def test_mps_none_starts_one_private_daemon_and_names_it_in_this_process_environment(fake_control):
    rollout = VLLMRollout(mps=None)
    assert rollout.mps_off_reason is None
    daemon = cuda_mps.active_private_mps()
    assert daemon is not None and daemon.root.name.startswith("lightning-rl-mps-")
    assert os.environ[cuda_mps.PIPE_ENV] == str(daemon.root / "pipe")  # inherited by the engine process
    assert os.environ[cuda_mps.LOG_ENV] == str(daemon.root / "log")
    VLLMRollout(mps=None)  # a second callback in this process (a notebook's next fit) uses the same daemon
    assert calls(fake_control) == [f"start {daemon.root / 'pipe'}"]


def test_the_trainer_joins_below_normal_and_spawns_its_engine_process_as_a_normal_client(fake_control, monkeypatch):
    from lightning_rl.rollout.vllm_internals import VLLMInternals

    VLLMRollout(mps=None)
    assert os.environ[cuda_mps.PRIORITY_ENV] == "1"  # read when this process's CUDA starts
    seen = {}

    class LLM:  # vLLM spawning its engine core: the environment the child inherits
        def __init__(self, **kwargs):
            seen["priority"] = os.environ.get(cuda_mps.PRIORITY_ENV)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    VLLMInternals.start_in_own_process({"model": "m"})
    assert seen == {"priority": "0"} and os.environ[cuda_mps.PRIORITY_ENV] == "1"


def test_a_client_priority_of_the_users_own_is_kept_for_both_processes(fake_control, monkeypatch):
    monkeypatch.setenv(cuda_mps.PRIORITY_ENV, "0")
    VLLMRollout(mps=None)
    assert cuda_mps.active_private_mps() is not None
    assert os.environ[cuda_mps.PRIORITY_ENV] == "0" and cuda_mps.ENGINE_PRIORITY_ENV not in os.environ
    assert cuda_mps.engine_process_environment() == {}


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"mps": False}, "mps=False"),
    ({"mps": None, "overlap": False}, "overlap=False: the engine runs in this process"),
    ({"mps": None, "engine_factory": lambda *a: None}, "a custom engine_factory"),
])
def test_no_daemon_where_no_engine_process_could_use_it(fake_control, kwargs, reason):
    assert VLLMRollout(**kwargs).mps_off_reason == reason
    assert calls(fake_control) == [] and cuda_mps.PIPE_ENV not in os.environ


def test_an_mps_daemon_of_the_users_own_is_left_alone(fake_control, monkeypatch):
    monkeypatch.setenv(cuda_mps.PIPE_ENV, "/srv/mps/pipe")
    assert "is set already" in VLLMRollout(mps=None).mps_off_reason
    assert os.environ[cuda_mps.PIPE_ENV] == "/srv/mps/pipe" and calls(fake_control) == []


def test_cuda_started_before_the_callback_means_no_daemon(fake_control, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "construct VLLMRollout before anything uses the GPU" in VLLMRollout(mps=None).mps_off_reason
    with pytest.raises(ValueError, match="CUDA is initialized in this process already"):
        VLLMRollout(mps=True)
    assert calls(fake_control) == []


def test_a_daemon_that_fails_to_start_or_to_serve_a_client_leaves_the_environment_as_it_was(fake_control,
                                                                                             monkeypatch):
    monkeypatch.setenv("FAKE_MPS_START_RC", "1")
    assert VLLMRollout(mps=None).mps_off_reason.endswith("exited with 1: cannot start: 1")
    monkeypatch.delenv("FAKE_MPS_START_RC")
    monkeypatch.setattr(cuda_mps, "probe_client", lambda env: "a CUDA client of the MPS daemon could not start")
    assert VLLMRollout(mps=None).mps_off_reason == "a CUDA client of the MPS daemon could not start"
    assert calls(fake_control)[-1] == "quit "  # the daemon that could not serve quits at once
    assert cuda_mps.PIPE_ENV not in os.environ and cuda_mps.active_private_mps() is None


def test_the_callback_keeps_mps_only_when_this_process_is_a_client(fake_control, monkeypatch):
    rollout = VLLMRollout(mps=None)
    daemon = cuda_mps.active_private_mps()
    pipe = daemon.root / "pipe"
    (pipe / "servers").write_text("4242\n")
    (pipe / "clients").write_text(f"111\n{os.getpid()}\n")
    assert rollout._check_mps_client("cuda") is True
    assert daemon.is_client(os.getpid()) and not daemon.is_client(999_999)
    monkeypatch.setenv("FAKE_MPS_NO_CLIENT_LIST", "1")  # a daemon without get_client_list: a server counts as yes
    assert daemon.is_client(999_999)
    monkeypatch.delenv("FAKE_MPS_NO_CLIENT_LIST")

    (pipe / "clients").write_text("111\n")  # CUDA started here before the daemon: this process is no client
    strict = VLLMRollout(mps=True)
    with pytest.raises(RuntimeError, match="not a client of the MPS daemon"):
        strict._check_mps_client("cuda")
    assert rollout._check_mps_client("cuda") is False
    assert "its CUDA started before the daemon" in rollout.mps_off_reason
    assert not set(MPS_KEYS) & set(os.environ)  # the engine process starts without it, at no priority
    assert calls(fake_control)[-1] == "quit "


def test_a_daemon_that_does_not_answer_stays_since_quitting_it_could_break_a_clients_context(fake_control,
                                                                                               monkeypatch, caplog):
    rollout = VLLMRollout(mps=None)
    daemon = cuda_mps.active_private_mps()
    monkeypatch.setattr(cuda_mps.PrivateMPS, "command", lambda self, text: None)
    assert daemon.is_client(os.getpid()) is None
    assert rollout._check_mps_client("cuda") is True
    assert "did not answer" in caplog.text
    assert cuda_mps.active_private_mps() is daemon and "quit " not in calls(fake_control)


def test_a_trainer_off_cuda_keeps_the_daemon_it_is_a_client_of_but_does_not_count_as_using_it(fake_control):
    rollout = VLLMRollout(mps=None)
    daemon = cuda_mps.active_private_mps()
    (daemon.root / "pipe" / "servers").write_text("4242\n")
    (daemon.root / "pipe" / "clients").write_text(f"{os.getpid()}\n")
    assert rollout._check_mps_client("cpu") is False
    assert cuda_mps.active_private_mps() is daemon and "quit " not in calls(fake_control)
    (daemon.root / "pipe" / "clients").write_text("")  # no client: the daemon quits before the engine starts
    assert rollout._check_mps_client("cpu") is False
    assert calls(fake_control)[-1] == "quit " and cuda_mps.active_private_mps() is None


def test_the_watchdog_quits_the_daemon_and_removes_its_folder_once_the_trainer_has_exited(fake_control, tmp_path):
    script = textwrap.dedent("""
        import sys
        from lightning_rl.rollout import cuda_mps
        cuda_mps.probe_client = lambda env: None
        daemon, reason = cuda_mps.start_private_mps()
        assert reason is None, reason
        print(daemon.root, flush=True)
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"})
    assert done.returncode == 0, done.stderr
    from pathlib import Path

    root = Path(done.stdout.strip())
    deadline = time.monotonic() + 30
    while (root.exists() or "quit " not in calls(fake_control)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls(fake_control) == [f"start {root / 'pipe'}", "quit "]
    assert not root.exists()
