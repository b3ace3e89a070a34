"""Errors through the CLI: the library's own message first, in a few lines, with the config key it concerns.

jsonargparse reports an exception raised while it builds a class from the config as "Does not
validate against any of the Union subtypes", with the real message in the middle of a long
traceback; for a list of classes (``trainer.plugins``, ``trainer.callbacks``) it keeps the exception only as
text, and the exception itself only in its frames. :func:`explain` finds the library's exception in the chain
or in those frames, the object it concerns
(the module, data module, callback or plugin) and the argument it names, and writes them out. An argument
is named from the message's words only for an error raised while the object was built; an error raised
during the run names one only in an explicit form (``name=``, a backticked name, its quoted value) in its first
line, the error's own statement: the lines after it list figures and advice (``quantize='int8'``). A
missing file (``FileNotFoundError`` and its kin, from any library) is explained too, and so is a Trainer setting
Lightning refuses (``MisconfigurationException``: an ``accelerator: gpu`` on a machine without one, say).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins import Precision

PACKAGE_DIR = Path(__file__).resolve().parent
TRACEBACK_ENV = "LIGHTNING_RL_TRACEBACK"
SECTIONS: tuple[tuple[type, str], ...] = (
    (L.LightningModule, "model"),
    (L.LightningDataModule, "data"),
    (L.Callback, "trainer.callbacks"),
    (Precision, "trainer.plugins"),
)
#: Errors about a path the user gave, explained whichever library raised them.
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _frames(tb: TracebackType | None) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _in_package(frame: Any) -> bool:
    return Path(frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _kept_by_jsonargparse(error: BaseException) -> list[BaseException]:
    """Exceptions that jsonargparse's frames in ``error``'s traceback hold in their local variables.

    Building a list of classes (``trainer.plugins: [...]``), jsonargparse tries each type of a Union, keeps each
    type's exception in a list and raises one ValueError with their messages as text, chained to the first
    type's exception only: the class's own exception (the library's, with its traceback) is left in that list.
    """
    found: list[BaseException] = []
    for frame in _frames(error.__traceback__):
        if not str(frame.f_globals.get("__name__", "")).startswith("jsonargparse"):
            continue
        for value in frame.f_locals.values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            found += [v for v in items if isinstance(v, BaseException)]
    return found


def _errors(error: BaseException) -> list[BaseException]:
    """``error``'s chain (:func:`_chain`), then the exceptions jsonargparse kept aside (:func:`_kept_by_jsonargparse`)
    and their chains, breadth first, each once.
    """
    seen: list[BaseException] = []
    queue = [error]
    while queue and len(seen) < 1000:
        current = queue.pop(0)
        chain = [e for e in _chain(current) if all(e is not s for s in seen)]
        seen += chain
        queue += [k for e in chain for k in _kept_by_jsonargparse(e)]
    return seen


def library_error(error: BaseException) -> BaseException | None:
    """The first exception that this library raised (its innermost frame is ours), or None.

    ``error``'s chain is searched first, then the exceptions jsonargparse's frames kept aside (:func:`_errors`).
    """
    for current in _errors(error):
        frames = _frames(current.__traceback__)
        if frames and _in_package(frames[-1]) and isinstance(current, Exception):
            return current
    return None


def _owner(error: BaseException) -> tuple[str, Any] | None:
    """``(config section, object)`` of the outermost library frame whose ``self`` is a configured object."""
    for frame in _frames(error.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, SaveConfigCallback):  # the CLI's own callback, not one of the config's
            continue
        for cls, section in SECTIONS:
            if isinstance(obj, cls) and _in_package(frame):
                return section, obj
    return None


def _init_arguments(cls: type) -> list[str]:
    """Constructor arguments of ``cls`` and of its bases (a subclass passes the bases' on with ``**kwargs``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        try:
            params = inspect.signature(init).parameters if init is not None else {}
        except (TypeError, ValueError):
            continue
        names += [p for p in params if p not in ("self", "args", "kwargs") and p not in names]
    return names


def _building(error: BaseException, obj: Any) -> bool:
    """Whether ``error`` was raised while ``obj`` was built (its ``__init__`` is in the traceback)."""
    return any(f.f_code.co_name == "__init__" and f.f_locals.get("self") is obj for f in _frames(error.__traceback__))


def _argument(message: str, obj: Any, building: bool = True) -> str | None:
    """The constructor argument of ``obj`` a message is about, or None.

    While ``obj`` is built: the first argument the message names, else one whose string value it contains.
    During the run the words of a message ("3 optimizer steps") name no argument: only ``name=``, a
    backticked ``name`` or the argument's quoted value (``'./no-such-dir'``) in its first line do; the lines
    below it hold figures and advice (``MemoryAwarePrecision(quantize='int8')``), not the cause.
    """
    names = _init_arguments(type(obj))
    if not building:  # the error's own statement, not the figures and advice of the lines below it
        message = message.split("\n", 1)[0]
    pattern = r"(?<![\w.]){0}(?!\w)" if building else r"(?<![\w.]){0}=|`{0}`"
    hits = [(m.start(), -len(n), n) for n in names if (m := re.search(pattern.format(re.escape(n)), message))]
    if hits:
        return min(hits)[2]
    hparams = getattr(obj, "hparams", {}) or {}
    for n in names:
        value = hparams.get(n, getattr(obj, n, None))
        if not isinstance(value, str) or len(value) < 3:
            continue
        quoted = (value,) if building else (repr(value), f'"{value}"', f"`{value}`")
        if any(q in message for q in quoted):
            return n
    return None


def _config_group(error: BaseException, ours: BaseException) -> tuple[str, Any] | None:
    """``(config key, object)`` of a config object (a dataclass argument such as ``model.init_args.sampling``) that
    raised ``ours`` while jsonargparse built it, before the object owning it existed; None when not found.

    The key is read from jsonargparse's frames (the section's action and the nested group); without them the
    object's class name stands for it.
    """
    frames = _frames(ours.__traceback__)
    obj = next((f.f_locals.get("self") for f in reversed(frames) if _in_package(f)), None)
    if obj is None or not dataclasses.is_dataclass(obj):
        return None
    group = next((getattr(g, "dest", None) for f in frames if (g := f.f_locals.get("group")) is not None
                  and getattr(g, "group_class", None) is type(obj)), None)
    sections = {section for _, section in SECTIONS}
    section = next((a.dest for f in _frames(error.__traceback__) if getattr(a := f.f_locals.get("self"), "dest", None)
                    in sections), None)
    if group is None or section is None:
        return type(obj).__name__, obj
    return f"{section}.init_args.{group}", obj


def explain(error: BaseException, config_keys: bool = True) -> str | None:
    """A few lines for a CLI user: the config key, the class, and the library's message; None when not ours.

    Args:
        error: what the CLI raised.
        config_keys: name the config key (``model.init_args.beta``); False names only the class (for
            ``export``, which has no config).
    """
    ours = library_error(error)
    if ours is None:
        path_error = next((e for e in _chain(error) if isinstance(e, PATH_ERRORS)), None)
        if path_error is not None:
            return _lines("", path_error, str(path_error))
        lightning_error = next((e for e in _chain(error) if isinstance(e, MisconfigurationException)), None)
        if lightning_error is None:
            return None
        advice = _accelerator_advice(lightning_error)  # the one whose config key is known
        return _lines("trainer.accelerator: " if advice else "", lightning_error, str(lightning_error) + advice)
    message = str(ours.args[0]) if isinstance(ours, KeyError) and ours.args else str(ours)
    owner = _owner(ours)
    where = ""
    if owner is not None:
        section, obj = owner
        cls = f"{type(obj).__module__.split('.')[0]}.{type(obj).__name__}"
        if not config_keys:
            where = f"{cls}: "
        elif arg := _argument(message, obj, _building(ours, obj)):
            where = f"{section}.init_args.{arg} ({cls}): "
        else:
            where = f"{section} ({cls}): "
    elif config_keys and (group := _config_group(error, ours)) is not None:
        key, obj = group
        arg = _argument(message, obj)
        where = f"{key}.{arg}: " if arg else f"{key}: "
    return _lines(where, ours, message)


def _accelerator_advice(error: BaseException) -> str:
    """The fix for Lightning's refusal of a GPU accelerator on a machine without one ("" for other refusals)."""
    message = str(error)
    if "No supported gpu backend found" in message or ("CUDAAccelerator" in message and "not available" in message):
        return (" This machine has no CUDA GPU that torch can use: set trainer.accelerator to auto (or cpu); the "
                "GPU example config (examples/grpo_smollm2_vllm.yaml) needs one")
    return ""


def _lines(where: str, error: BaseException, message: str) -> str:
    """The two lines :func:`explain` prints."""
    return (f"error: {where}{type(error).__name__}: {message}\n"
            f"(the full traceback: set {TRACEBACK_ENV}=1)")
