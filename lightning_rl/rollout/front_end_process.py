"""vLLM's front end in a process of its own, so that generating takes nothing from the trainer's interpreter.

:class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine` runs vLLM's engine core in a child process, but
vLLM's front end (``vllm.LLM``: the loop that receives every decode step's outputs from the core and turns them
into completions) stays in the process that made it. With the rollout overlapping the update, that loop runs in
the trainer's rollout thread and shares the trainer's interpreter with the update, step after step.

:class:`RemoteLLM` starts a CPU-only child process that makes the ``vllm.LLM`` there (its engine core in a
grandchild, as before) and answers one message per call: a whole rollout comes back as one pickle of token ids,
sampled log-probs and finish reasons. The trainer's rollout thread only waits on a pipe meanwhile. Weight syncs
pass through unchanged: the CUDA IPC handles are opened by the engine core, never by the front end, which is
meant to hold no GPU memory (vLLM's front end asks NVML, not CUDA, about the GPU; the GPU tests check it).

When the trainer dies, the pipe closes and the front end shuts its engine down and exits; a watchdog also exits
when the parent process is gone.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import multiprocessing
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_rl.frozen_objects import objects_frozen
from lightning_rl.rollout.engine_steps import EngineSteps, StepClock
from lightning_rl.rollout.vllm_internals import main_module_hidden

#: The calls the front end answers (anything else is refused).
CALLS = ("generate", "collective_rpc", "reset_prefix_cache")
_POLL_S = 0.5
_SHUTDOWN = -1  # the sequence number of the shutdown message and its answer


@dataclass(frozen=True)
class SampledLogprobs:
    """The sampled token's log-prob at each position, in the layout of vLLM's flat log-probs (one entry each)."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def start_indices(self) -> range:
        """Where each position's entries start (one entry per position)."""
        return range(len(self.token_ids))


@dataclass(frozen=True)
class Completion:
    """One completion as :func:`~lightning_rl.rollout.vllm_outputs.rollout_from_outputs` reads it."""

    index: int
    token_ids: list[int]
    logprobs: SampledLogprobs
    finish_reason: str | None


@dataclass(frozen=True)
class PromptOutput:
    """A prompt's completions (``vllm.RequestOutput``'s fields that a rollout needs)."""

    outputs: list[Completion]


def compact_outputs(outputs: Sequence[Any]) -> list[PromptOutput]:
    """``vllm.LLM.generate``'s outputs reduced to token ids, sampled log-probs and finish reasons."""
    from lightning_rl.rollout.vllm_outputs import sampled_logprobs

    compact = []
    for out in outputs:
        completions = []
        for c in out.outputs:
            ids = list(c.token_ids)
            completions.append(Completion(c.index, ids, SampledLogprobs(ids, sampled_logprobs(c.logprobs, ids)),
                                          c.finish_reason))
        compact.append(PromptOutput(completions))
    return compact


class FrontEndError(RuntimeError):
    """The front-end process failed a call, or died."""


def _error_reply(seq: int, err: BaseException) -> tuple[int, str, str]:
    return seq, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent:
            os._exit(1)  # the trainer is gone without closing the pipe; the engine core follows its own parent


def serve(conn: Any, factory: str, kwargs: Mapping[str, Any], parent: int) -> None:
    """The front-end process: make the engine with ``factory(kwargs)``, then answer calls until told to stop.

    Each message is ``(sequence number, call, args, kwargs)`` and each answer ``(the same number, status, value)``,
    so that an answer the trainer stopped waiting for (an interrupted call) is never taken for the next one's.

    Args:
        conn: this end of the pipe to the trainer.
        factory: ``"module:function"`` returning an object with ``.llm`` (a ``vllm.LLM``) and ``.shutdown()``.
        kwargs: the ``vllm.LLM`` arguments.
        parent: the trainer's process id (the watchdog exits when the parent changes).
    """
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="lightning-rl-watchdog").start()
    try:
        internals = resolve_factory(factory)(kwargs)
    except BaseException as err:  # noqa: BLE001 - the trainer raises it
        conn.send(_error_reply(0, err))
        return
    with objects_frozen():  # the startup's objects (torch, vLLM, the tokenizer): collections walk only the rollouts'
        _answer_calls(conn, internals)


def _answer_calls(conn: Any, internals: Any) -> None:
    """Tell the trainer the engine is ready, answer its calls until told to stop, then shut the engine down."""
    conn.send((0, "ready", None))
    clock = StepClock(internals.llm)
    try:
        while True:
            try:
                seq, call, args, call_kwargs = conn.recv()
            except (EOFError, OSError):  # the trainer closed its end or died
                return
            if call == "shutdown":
                return
            try:
                if call not in CALLS:
                    raise ValueError(f"the front end answers {CALLS} and 'shutdown', not {call!r}")
                if call == "generate":  # the completions, and how the engine's steps went
                    outputs, steps = clock.run(functools.partial(internals.llm.generate, *args, **call_kwargs))
                    conn.send((seq, "ok", (compact_outputs(outputs), steps)))
                else:
                    conn.send((seq, "ok", getattr(internals.llm, call)(*args, **call_kwargs)))
            except Exception as err:  # noqa: BLE001 - sent to the trainer, which raises it
                conn.send(_error_reply(seq, err))
    finally:
        internals.shutdown()
        try:
            conn.send((_SHUTDOWN, "stopped", None))
        except (BrokenPipeError, OSError):
            pass


class RemoteLLM:
    """A ``vllm.LLM`` in a CPU-only child process, with the three calls an engine process uses.

    Args:
        kwargs: the ``vllm.LLM`` arguments.
        factory: ``"module:function"`` that makes the engine in the child from ``kwargs`` (default: vLLM's engine
            core in a grandchild, :meth:`~lightning_rl.rollout.vllm_internals.VLLMInternals.start_in_own_process`).
        start_timeout: seconds to wait for the engine to start.

    Raises:
        FrontEndError: the engine failed to start in the child (its error and traceback are in the message).
    """

    def __init__(self, kwargs: Mapping[str, Any],
                 factory: str = "lightning_rl.rollout.vllm_internals:VLLMInternals.start_in_own_process",
                 start_timeout: float = 1800.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # a CUDA parent cannot fork
        self._conn, child_conn = ctx.Pipe()
        self._lock = threading.Lock()
        self._seq = 0  # the last call's number; the start's answer is 0
        self.last_engine_steps: EngineSteps | None = None  # the last generate's (timed in the child)
        # not a daemon: it starts the engine core as a child of its own, which a daemonic process may not do
        self.process = ctx.Process(target=serve, args=(child_conn, check_factory_path(factory), dict(kwargs),
                                                       os.getpid()),
                                   daemon=False, name="lightning-rl-vllm-front-end")
        with main_module_hidden():  # the child must not run the user's training script again
            self.process.start()
        child_conn.close()
        # at the interpreter's exit without a shutdown, stop it before multiprocessing waits for its children:
        # registered after multiprocessing's own exit hook, so it runs first
        self._finalizer = weakref.finalize(self, _stop_front_end, self.process, self._conn, self._lock, True)
        self._finalizer.atexit = False
        atexit.register(self._finalizer)
        t0 = time.perf_counter()
        try:
            self._receive(0, deadline=t0 + start_timeout, what="start")
        except BaseException:
            self._stop(graceful=False)
            raise
        self.startup_time = time.perf_counter() - t0

    # ----------------------------------------------------------------------------- calls
    def _receive(self, seq: int, deadline: float | None, what: str) -> Any:
        while True:
            while not self._conn.poll(_POLL_S):
                if not self.process.is_alive():
                    raise FrontEndError(f"the vLLM front-end process died during {what} "
                                        f"(exit code {self.process.exitcode})")
                if deadline is not None and time.perf_counter() > deadline:
                    raise FrontEndError(f"the vLLM front-end process did not answer {what} in time")
            answered, status, value = self._conn.recv()
            if answered == seq:  # else the answer to a call the trainer stopped waiting for
                break
        if status == "error":
            raise FrontEndError(f"the vLLM front-end process failed at {what}: {value}")
        return value

    def _call(self, call: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:  # one call at a time: the pipe carries one conversation
            if not self.process.is_alive():
                raise FrontEndError(f"the vLLM front-end process has exited (exit code {self.process.exitcode})")
            self._seq += 1
            self._conn.send((self._seq, call, args, kwargs))
            return self._receive(self._seq, deadline=None, what=call)

    def generate(self, prompts: Sequence[Any], params: Any, use_tqdm: bool = False,
                 lora_request: Any = None) -> list[PromptOutput]:
        """``vllm.LLM.generate`` in the child; one :class:`PromptOutput` per prompt (its engine steps are kept as
        ``last_engine_steps``).
        """
        outputs, self.last_engine_steps = self._call("generate", list(prompts), params, use_tqdm=use_tqdm,
                                                     lora_request=lora_request)
        return outputs

    def collective_rpc(self, method: str, args: tuple = ()) -> Any:
        """``vllm.LLM.collective_rpc`` in the child (the engine core's workers run ``method``)."""
        return self._call("collective_rpc", method, args=args)

    def reset_prefix_cache(self) -> Any:
        """``vllm.LLM.reset_prefix_cache`` in the child."""
        return self._call("reset_prefix_cache")

    # ----------------------------------------------------------------------------- lifecycle
    def _stop(self, graceful: bool) -> None:
        self._finalizer.detach()
        _stop_front_end(self.process, self._conn, self._lock, graceful)

    def shutdown(self) -> None:
        """Stop the engine and the child process (idempotent)."""
        if not self._conn.closed:
            self._stop(graceful=True)


def _stop_front_end(process: Any, conn: Any, lock: threading.Lock, graceful: bool, timeout: float = 60.0) -> None:
    """Ask the front end to shut its engine down and exit; end the process if it does not."""
    if graceful and process.is_alive() and not conn.closed:
        try:
            with lock:
                conn.send((_SHUTDOWN, "shutdown", (), {}))
                deadline = time.perf_counter() + timeout
                while conn.poll(max(0.0, deadline - time.perf_counter())):
                    if conn.recv()[0] == _SHUTDOWN:  # earlier answers nobody waited for go first
                        break
        except (BrokenPipeError, EOFError, OSError):
            pass
    process.join(timeout if graceful else 5.0)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


class RemoteInternals:
    """What :class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine` keeps of its engine: ``llm``, ``shutdown``."""

    def __init__(self, llm: RemoteLLM) -> None:
        self.llm = llm

    def shutdown(self) -> None:
        """Stop the front end and its engine."""
        self.llm.shutdown()


def check_factory_path(factory: str) -> str:
    """``factory`` when it has the form ``module:attribute[.attribute...]`` (checked before a child is spent on it)."""
    module, sep, name = factory.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"factory must be 'module:function', got {factory!r}")
    return factory


def resolve_factory(factory: str) -> Callable[..., Any]:
    """The object ``module:attribute[.attribute...]`` names (imported in the process that calls it)."""
    module, _, name = check_factory_path(factory).partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def start_in_front_end_process(kwargs: Mapping[str, Any]) -> RemoteInternals:
    """Start ``vllm.LLM(**kwargs)`` with its front end in a child process and its engine core in a grandchild."""
    return RemoteInternals(RemoteLLM(kwargs))


__all__ = ["CALLS", "Completion", "FrontEndError", "PromptOutput", "RemoteInternals", "RemoteLLM",
           "SampledLogprobs", "check_factory_path", "compact_outputs", "resolve_factory", "serve",
           "start_in_front_end_process"]

