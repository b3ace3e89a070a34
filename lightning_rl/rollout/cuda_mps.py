"""A private CUDA Multi-Process Service (MPS) daemon for the trainer and its engine process.

With the engine in a process of its own (``VLLMRollout`` overlapping the update), two processes share one GPU.
Without MPS the GPU time-slices them: the engine's short decode steps wait for the update's slices. Under MPS both
processes are clients of one server, and their kernels run on the GPU at the same time. Measured end to end on an
H100 with a daemon the bench started (2026-12-05, ``bench/bench_vs_trl.py``, the README's configuration): SmolLM2
full fine-tune 0.405 s a step against 0.475 s without (and 0.504 against 0.581 s in another call), the same peak
memory within 0.08 GiB; on another H100 this module's daemon (both clients at the same priority) gave no gain.

The daemon here is private: its pipe and log folders are a temporary folder of its own, so only processes whose
environment names that folder (this process, once :func:`start_private_mps` sets ``CUDA_MPS_PIPE_DIRECTORY``
before CUDA starts, and the processes it starts) are its clients; other users' processes and the card's settings
are untouched. The CUDA driver connects to MPS when CUDA is first initialized in a process, so the daemon must run
before that. A watchdog process quits the daemon and removes its folder once this process has exited, however it
exits (a server quit under a live client would break that client's CUDA context, so nothing quits it earlier).

The engine's generation sets the step (the update ends first), and under MPS the update's kernels took SMs from
the engine's decode steps: on an H100 the trainer waited longer for the generation in both calls, and the
callback's daemon gave no gain (``docs/gpu_settings.md``). So this process (the trainer) joins as a below-normal
priority client (``CUDA_MPS_CLIENT_PRIORITY=1``, NVIDIA's MPS client priority) and its engine process as a
normal one: the engine's kernels go first, the update takes the SMs they leave. Where the environment already
sets ``CUDA_MPS_CLIENT_PRIORITY``, both processes keep that value. On an H100 (2026-12-05) that step took as long
as the defaults' without MPS (0.529 against 0.527 s) and less than both clients at normal priority (0.617 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
#: NVIDIA's MPS client priority, read when a client's CUDA starts: "0" normal, "1" below normal.
PRIORITY_ENV = "CUDA_MPS_CLIENT_PRIORITY"
#: Set beside a below-normal :data:`PRIORITY_ENV` in the trainer: the priority its engine process starts with.
ENGINE_PRIORITY_ENV = "LIGHTNING_RL_MPS_ENGINE_PRIORITY"
TRAINER_PRIORITY, ENGINE_PRIORITY = "1", "0"
_TIMEOUT_S = 30

# A CUDA client of the daemon, without torch (a fraction of a second): the driver connects to the server at cuInit,
# and a context makes the server start. Exit status 0 when both work.
_CLIENT_PROBE = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
device, context = ctypes.c_int(), ctypes.c_void_p()
ok = (cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
      and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0)
sys.exit(0 if ok else 3)
"""

# The watchdog: waits for its parent (the trainer) to be gone, then quits the daemon its environment names and
# removes the daemon's folder.
_WATCHDOG = """
import os, shutil, subprocess, sys, time
parent, root, control = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.stdin.read()  # end of file: the parent closed the pipe, at its exit (or its death)
while True:
    try:
        os.kill(parent, 0)
    except OSError:
        break
    time.sleep(0.2)
try:
    subprocess.run([control], input="quit\\n", text=True, timeout=60, capture_output=True)
finally:
    shutil.rmtree(root, ignore_errors=True)
"""


@dataclass
class PrivateMPS:
    """A running private MPS control daemon (:func:`start_private_mps`).

    Attributes:
        root: its folder (``pipe/`` and ``log/``), removed when this process has exited.
        control: the path of ``nvidia-cuda-mps-control``.
        watchdog: the process that quits the daemon after this one.
        priorities: the client priorities it set in this process's environment (:func:`client_priorities`).
    """

    root: Path
    control: str
    watchdog: subprocess.Popen | None = None
    priorities: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment entries that make a process a client of this daemon."""
        return {PIPE_ENV: str(self.root / "pipe"), LOG_ENV: str(self.root / "log")}

    def environment(self) -> dict[str, str]:
        """The current environment with :attr:`env` added: for the daemon's commands and the processes it serves."""
        return {**os.environ, **self.env}

    def command(self, text: str) -> str | None:
        """Send one command to the daemon (``get_server_list``, ...); its answer, or None when it failed."""
        try:
            done = subprocess.run([self.control], input=text + "\n", text=True, capture_output=True,
                                  env=self.environment(), timeout=_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    def server_pids(self) -> list[int] | None:
        """Process ids of the daemon's MPS servers (one starts when the first client connects); None: no answer."""
        answer = self.command("get_server_list")
        return None if answer is None else _pids(answer)

    def is_client(self, pid: int) -> bool | None:
        """Whether process ``pid`` is a client of this daemon's server; None when the daemon did not answer.

        Asks the server for its clients (``get_client_list``); where the daemon has no such command, a running server
        counts as yes (callers ask before starting any other client).
        """
        servers = self.server_pids()
        if servers is None:
            return None
        for server in servers:
            clients = self.command(f"get_client_list {server}")
            if clients is None or pid in _pids(clients):
                return True
        return False


_DAEMON: PrivateMPS | None = None  # this process's daemon, once started (it lives as long as the process)


def _pids(text: str | None) -> list[int]:
    return [int(tok) for tok in (text or "").split() if tok.isdigit()]


def active_private_mps() -> PrivateMPS | None:
    """The private daemon this process started, if it started one and its environment still names it."""
    if _DAEMON is not None and os.environ.get(PIPE_ENV) == _DAEMON.env[PIPE_ENV]:
        return _DAEMON
    return None


def mps_unavailable_reason() -> str | None:
    """Why a private MPS daemon cannot serve this process (None: it can be tried)."""
    if not sys.platform.startswith("linux"):
        return "CUDA MPS runs on Linux only"
    if os.environ.get(PIPE_ENV) and active_private_mps() is None:
        return f"{PIPE_ENV} is set already (an MPS daemon of your own serves this process, or none)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return "several training processes (one private daemon per process is not supported)"
    if shutil.which(CONTROL) is None:
        return f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)"
    import torch

    if torch.cuda.is_initialized():
        return ("CUDA is initialized in this process already: MPS only serves a process whose CUDA starts after the "
                "daemon (construct VLLMRollout before anything uses the GPU)")
    return None


def start_private_mps() -> tuple[PrivateMPS | None, str | None]:
    """Start this process's private MPS daemon (or return the one it started) and make this process its client.

    Sets ``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY`` in ``os.environ`` (the processes started from
    here inherit them) once a probe process has connected to the daemon as a CUDA client. Anything that fails
    leaves the environment as it was.

    Returns:
        The daemon and None, or None and why it did not start.
    """
    global _DAEMON
    if (daemon := active_private_mps()) is not None:
        return daemon, None
    if reason := mps_unavailable_reason():
        return None, reason
    control = shutil.which(CONTROL)
    root = Path(tempfile.mkdtemp(prefix="lightning-rl-mps-"))
    daemon = PrivateMPS(root, control)
    (root / "pipe").mkdir()
    (root / "log").mkdir()
    env = daemon.environment()
    # its messages go to a file, not a pipe: a daemon that kept a pipe's end open would hold run() until the timeout
    with tempfile.TemporaryFile("w+") as out:
        try:
            started = subprocess.run([control, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     timeout=_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            shutil.rmtree(root, ignore_errors=True)
            return None, f"{CONTROL} -d failed: {err}"
        out.seek(0)
        message = out.read().strip()
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        return None, f"{CONTROL} -d exited with {started.returncode}: {message}"
    daemon.watchdog = _start_watchdog(daemon)  # from here on the daemon quits when this process has gone
    if reason := probe_client(env):
        daemon.command("quit")
        return None, reason
    daemon.priorities = client_priorities(os.environ)
    os.environ.update({**daemon.env, **daemon.priorities})
    _DAEMON = daemon
    log.info("CUDA MPS: a private daemon in %s serves this process and its engine process", root)
    return daemon, None


def client_priorities(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment entries that make this process a below-normal client and its engine process a normal one.

    Nothing where ``environ`` sets :data:`PRIORITY_ENV` already (the user's choice, which both processes inherit).
    """
    if PRIORITY_ENV in environ:
        return {}
    return {PRIORITY_ENV: TRAINER_PRIORITY, ENGINE_PRIORITY_ENV: ENGINE_PRIORITY}


def engine_process_environment() -> dict[str, str]:
    """The entries an engine process must start with to take the MPS priority its trainer chose for it (or none)."""
    priority = os.environ.get(ENGINE_PRIORITY_ENV)
    return {PRIORITY_ENV: priority} if priority else {}


def probe_client(env: dict[str, str]) -> str | None:
    """Start a CUDA client of the daemon named in ``env`` in a short process; None when it worked, else why not."""
    try:
        done = subprocess.run([sys.executable, "-c", _CLIENT_PROBE], env=env, capture_output=True, text=True,
                              timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        return f"a CUDA client of the MPS daemon could not start: {err}"
    if done.returncode != 0:
        return (f"a CUDA client of the MPS daemon could not start (exit status {done.returncode}"
                f"{': ' + done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''})")
    return None


def _start_watchdog(daemon: PrivateMPS) -> subprocess.Popen:
    """A process that quits ``daemon`` and removes its folder after this process has exited."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(daemon.root), daemon.control],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=daemon.environment())


def leave_private_mps(reason: str) -> None:
    """Stop using this process's daemon where no process is its client yet: the environment loses its entries, and the
    daemon quits (its watchdog still removes the folder at exit).

    Args:
        reason: why, for the log.
    """
    global _DAEMON
    daemon = active_private_mps()
    if daemon is None:
        return
    for key in {**daemon.env, **daemon.priorities}:
        os.environ.pop(key, None)
    _DAEMON = None
    daemon.command("quit")
    log.info("CUDA MPS: not used (%s)", reason)
