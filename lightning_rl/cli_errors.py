"""Errors through the CLI: the library's own message first, in a few lines, with the config key it concerns.

jsonargparse reports an exception raised while it builds a class from the config as "Does not
validate against any of the Union subtypes", with the real message in the middle of a long
traceback. :func:`explain` finds the library's exception in the chain, the object it concerns
(the module, data module, callback or plugin) and the argument it names, and writes them out.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning as L
from lightning.pytorch.plugins import Precision

PACKAGE_DIR = Path(__file__).resolve().parent
TRACEBACK_ENV = "LIGHTNING_RL_TRACEBACK"
SECTIONS: tuple[tuple[type, str], ...] = (
    (L.LightningModule, "model"),
    (L.LightningDataModule, "data"),
    (L.Callback, "trainer.callbacks"),
    (Precision, "trainer.plugins"),
)


def _frames(tb: TracebackType | None) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _in_package(frame: Any) -> bool:
    return Path(frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def library_error(error: BaseException) -> BaseException | None:
    """The first exception of ``error``'s chain that this library raised (its innermost frame is ours), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = _frames(current.__traceback__)
        if frames and _in_package(frames[-1]) and isinstance(current, Exception):
            return current
        current = current.__cause__ or current.__context__
    return None


def _owner(error: BaseException) -> tuple[str, Any] | None:
    """``(config section, object)`` of the outermost library frame whose ``self`` is a configured object."""
    for frame in _frames(error.__traceback__):
        obj = frame.f_locals.get("self")
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


def _argument(message: str, obj: Any) -> str | None:
    """The constructor argument of ``obj`` a message is about: the first it names, else one whose value it quotes."""
    names = _init_arguments(type(obj))
    hits = [(m.start(), -len(n), n) for n in names if (m := re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message))]
    if hits:
        return min(hits)[2]
    hparams = getattr(obj, "hparams", {}) or {}
    for n in names:
        value = hparams.get(n, getattr(obj, n, None))
        if isinstance(value, str) and len(value) >= 3 and value in message:
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


def explain(error: BaseException) -> str | None:
    """A few lines for a CLI user: the config key, the class, and the library's message; None when not ours."""
    ours = library_error(error)
    if ours is None:
        return None
    message = str(ours.args[0]) if isinstance(ours, KeyError) and ours.args else str(ours)
    owner = _owner(ours)
    where = ""
    if owner is not None:
        section, obj = owner
        arg = _argument(message, obj)
        cls = f"{type(obj).__module__.split('.')[0]}.{type(obj).__name__}"
        where = f"{section}.init_args.{arg} ({cls}): " if arg else f"{section} ({cls}): "
    elif (group := _config_group(error, ours)) is not None:
        key, obj = group
        arg = _argument(message, obj)
        where = f"{key}.{arg}: " if arg else f"{key}: "
    return (f"error: {where}{type(ours).__name__}: {message}\n"
            f"(the full traceback: set {TRACEBACK_ENV}=1)")
