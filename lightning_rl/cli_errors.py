"""Errors through the CLI: the library's own message first, in a few lines, with the config key it concerns.

jsonargparse reports an exception raised while it builds a class from the config as "Does not
validate against any of the Union subtypes", with the real message in the middle of a long
traceback. :func:`explain` finds the library's exception in the chain, the object it concerns
(the module, data module, callback or plugin) and the argument it names, and writes them out.
"""

from __future__ import annotations

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


def _argument(message: str, obj: Any) -> str | None:
    """The constructor argument of ``obj`` a message is about: the first it names, else one whose value it quotes."""
    try:
        names = [p for p in inspect.signature(type(obj).__init__).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return None
    hits = [(m.start(), -len(n), n) for n in names if (m := re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message))]
    if hits:
        return min(hits)[2]
    hparams = getattr(obj, "hparams", {}) or {}
    for n in names:
        value = hparams.get(n, getattr(obj, n, None))
        if isinstance(value, str) and len(value) >= 3 and value in message:
            return n
    return None


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
    return (f"error: {where}{type(ours).__name__}: {message}\n"
            f"(the full traceback: set {TRACEBACK_ENV}=1)")
