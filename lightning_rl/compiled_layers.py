"""Regional compilation of the policy's decoder layers for the update.

A small model's update is bound by kernel launches: every decoder layer runs its norms, activation and
rotary embedding as a few dozen small kernels, in the forward, the recomputed forward and the backward.
``torch.compile`` of one decoder layer fuses them; all layers of one class share the compiled code
(their parameters are graph inputs), so the compile cost is paid once, not once per layer.

Dynamo keeps its compiled code on the Python code object it ran and stops compiling a code object after
``torch._dynamo.config.recompile_limit`` variants (8), running it eagerly from then on with only a log warning.
Each model therefore compiles its own copy of the class's ``forward`` code: a process that fits several models
(a sweep, a notebook, a test session) would otherwise reach that limit with all their variants together, and
its later models would run eagerly.

Only the update runs compiled: a layer in train mode with gradients on, or inside the forward of the library's
offloaded checkpoint (gradients off there; the backward recomputes the layer with them). Generation (with a KV
cache), evaluation and reference log-probs run the eager layer. A compiler failure (no C compiler, an operator
inductor cannot lower) falls back to the eager layer with one warning, so training goes on.

transformers checkpoints a layer in one of two places: up to 5.22 in ``GradientCheckpointingLayer.__call__``,
around the whole module call (so around the compiled ``forward``); from 5.23 inside the class's ``forward``
(``forward_with_checkpointing``), which :class:`_CompiledClassForward` then compiles, or unwraps to checkpoint
outside the graph. Both run both passes of an offloaded layer compiled.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_rl.checkpoint_offload import (
    in_checkpoint_forward,
    offloaded_checkpoint,
    offloads_layer_inputs,
    uses_reentrant_checkpoint,
)

log = logging.getLogger(__name__)

class _CompiledClassForward:
    """One compiled ``forward`` per decoder-layer class, shared by its layers, with an eager fallback.

    transformers 5.23 and later wrap a layer class's ``forward`` in their checkpointing
    (``GradientCheckpointingLayer``); compiled, that wrapper's checkpoint becomes part of the graph. A layer whose
    input is offloaded (:mod:`lightning_rl.checkpoint_offload`), or one marked for the library's reentrant
    checkpoint (a sliced MLP, :mod:`lightning_rl.tiled_mlp`), compiles the wrapped ``forward`` alone and
    checkpoints it outside the graph instead. Earlier versions checkpoint in ``__call__``, outside this
    ``forward``: an offloaded layer then arrives here inside the checkpoint's forward, gradients off
    (:func:`~lightning_rl.checkpoint_offload.in_checkpoint_forward`), and runs compiled there too.
    """

    def __init__(self, cls: type, backend: str | Callable, dynamic: bool | None) -> None:
        self.eager = cls.forward
        self.compiled = torch.compile(own_code_copy(cls.forward), backend=backend, dynamic=dynamic)
        self.inner = checkpoint_wrapped(cls.forward)  # the layer's math, without transformers' checkpoint
        self.compiled_inner = (torch.compile(own_code_copy(self.inner), backend=backend, dynamic=dynamic)
                               if self.inner is not None else None)
        self.failed: str | None = None

    def __call__(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None and layer.training and (torch.is_grad_enabled() or in_checkpoint_forward()):
            offload = offloads_layer_inputs(layer)
            if (self.inner is not None and (offload or uses_reentrant_checkpoint(layer))
                    and getattr(layer, "gradient_checkpointing", False)):
                return offloaded_checkpoint(functools.partial(self._inner, layer, **uncached(layer, kwargs)), *args,
                                            offload=offload)
            try:
                return self.compiled(layer, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:  # compile errors happen before any compute
                self._fail(layer, err)
        return self.eager(layer, *args, **kwargs)

    def _inner(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The layer's math, compiled unless compiling failed (in the forward or in the backward's recompute)."""
        if self.failed is None:
            try:
                return self.compiled_inner(layer, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:
                self._fail(layer, err)
        return self.inner(layer, *args, **kwargs)

    def _fail(self, layer: nn.Module, err: BaseException) -> None:
        self.failed = failure_summary(err)
        log.warning("torch.compile of %s failed (%s); its layers run eagerly from now on "
                    "(pass compile_layers=False to skip compiling)", type(layer).__name__, self.failed)


def checkpoint_wrapped(forward: Callable) -> Callable | None:
    """The function transformers' checkpointing wrapper (5.23 and later) wraps in ``forward``, else None.

    Only that wrapper counts: other decorators (``deprecate_kwarg``) set ``__wrapped__`` as well, and unwrapping
    one of them would checkpoint a layer that transformers (in ``__call__``, up to 5.22) checkpoints already.
    """
    code = getattr(forward, "__code__", None)
    if code is None or code.co_name != "forward_with_checkpointing":
        return None
    return getattr(forward, "__wrapped__", None)


def uncached(layer: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A checkpointed layer's keyword arguments without a KV cache, as transformers' checkpointing wrapper passes them.

    The recompute would update a cache a second time.
    """
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for name in ("cache", "layer_past", "past_key_values", "past_key_value"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return kwargs


def own_code_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: the same function, with a dynamo cache (and recompile count) of its own.

    Args:
        fn: a plain Python function (a class's ``forward``); anything else comes back as it is.
    """
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return copy


def failure_summary(err: BaseException) -> str:
    """One line naming a compiler failure and its root cause."""
    cause = err.__cause__ or getattr(err, "inner_exception", None) or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


# The shortest runs (``Trainer(max_steps=...)``) whose compile pays for itself: the first step's compile against the
# time each later step saves, on the GPU machine (README, ``compile_layers``). A full fine-tune: 8-25 s of compile,
# 0.13 s saved a step (SmolLM2, 0.80 against 0.93 s a step on an H200): even after 60-190 steps. LoRA r=16: 45-90 s
# of compile (69 s on an H100 on 2026-12-05, 46 of them in inductor's code generation), 0.06-0.20 s saved a step:
# even after 225-1,500 steps.
COMPILE_FROM_STEPS = 200
COMPILE_FROM_STEPS_LORA = 500


def auto_compile_layers(device_type: str, sharded: bool, max_steps: int = -1, lora: bool = False) -> bool:
    """What ``compile_layers=None`` means: compile on a CUDA device, unsharded, in a run long enough to earn it.

    Measured end to end on an H200 (bench/results/vs_trl_NOTES.md): a SmolLM2 full fine-tune took 0.80 s a
    GRPO step compiled against 0.93 s eager, with less memory; with LoRA r=16 and the engine beside the update,
    0.62 and 0.48 s compiled against 0.68 s eager (two runs). On a CPU the compile takes longer than the updates
    it speeds up; FSDP2-sharded layers were not measured compiled.

    Args:
        device_type: the training device's type.
        sharded: the layers are FSDP2-sharded (``ModelParallelStrategy``).
        max_steps: the Trainer's ``max_steps``; -1 (or 0): no limit by steps, which counts as long. Below
            :data:`COMPILE_FROM_STEPS` (:data:`COMPILE_FROM_STEPS_LORA` for a LoRA policy) the first step's compile
            costs more than the run's later steps save, so such a run stays eager.
        lora: the policy trains LoRA adapters (its compile takes several times longer).
    """
    return device_type == "cuda" and not sharded and run_earns_compile(max_steps, lora)


def run_earns_compile(max_steps: int, lora: bool = False) -> bool:
    """Whether a run of ``max_steps`` (-1 or 0: no limit by steps) is long enough to earn the layers' compile."""
    return max_steps <= 0 or max_steps >= (COMPILE_FROM_STEPS_LORA if lora else COMPILE_FROM_STEPS)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: ``GradientCheckpointingLayer`` subclasses, else ``*DecoderLayer`` modules."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    return [m for m in model.modules()
            if (GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer))
            or type(m).__name__.endswith("DecoderLayer")]


def compile_decoder_layers(model: nn.Module, backend: str | Callable = "inductor",
                           dynamic: bool | None = True) -> int:
    """Run the decoder layers of ``model`` through ``torch.compile`` during the update (idempotent).

    Args:
        model: a transformers causal LM, or a peft wrapper of one.
        backend: the ``torch.compile`` backend (tests use ``aot_eager``).
        dynamic: compile for any sequence length at once (rollouts change the length every step).

    Returns:
        The number of layers that now dispatch to compiled code.
    """
    shared: dict[type, _CompiledClassForward] = {}
    layers = decoder_layers(model)
    for layer in layers:
        if is_compiled(layer):
            continue
        cls = type(layer)
        if cls not in shared:
            shared[cls] = _CompiledClassForward(cls, backend, dynamic)
        layer.forward = types.MethodType(shared[cls], layer)  # an instance attribute: state dicts are unchanged
    return len(layers)


def is_compiled(layer: nn.Module) -> bool:
    """Whether ``layer``'s ``forward`` dispatches to compiled code (set by :func:`compile_decoder_layers`)."""
    return isinstance(getattr(vars(layer).get("forward"), "__func__", None), _CompiledClassForward)


def compiled_layer_count(model: nn.Module) -> int:
    """How many decoder layers of ``model`` dispatch to compiled code."""
    return sum(is_compiled(m) for m in decoder_layers(model))
