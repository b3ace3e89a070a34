"""Hyperparameters as plain data: import paths and ``{"class_path", "init_args"}`` mappings, and back.

Checkpoints load with ``torch.load(weights_only=True)``, which refuses pickled Python objects, so
the modules store their hyperparameters (reward functions, callables, config objects such as
:class:`~lightning_rl.rollout.SamplingConfig`) in this form and resolve it back when the module is
rebuilt from a checkpoint.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")
_PRIMITIVES = (str, int, float, bool, type(None))


def import_object(path: str) -> Any:
    """Import ``"package.module.name"`` (attributes after the module allowed)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    if path.startswith("__main__."):
        name = path[len("__main__."):]
        raise ImportError(
            f"cannot import {path!r}: it was defined in the script that saved the checkpoint (__main__), which this "
            f"process cannot import. Pass it again, e.g. Module.load_from_checkpoint(path, reward_funcs=[{name}, ...]) "
            "(all of them, in the same order), or define it in an importable module so checkpoints can name it"
        )
    raise ImportError(f"cannot import {path!r}: give an import path such as 'my_package.rewards.my_reward'")


def resolve_callable(spec: Any) -> Any:
    """A callable from itself, an import path, or ``{"class_path": ..., "init_args": {...}}``."""
    if isinstance(spec, str):
        return import_object(spec)
    if isinstance(spec, Mapping) and "class_path" in spec:
        cls = import_object(spec["class_path"])
        return cls(**dict(spec.get("init_args") or {}))
    return spec


def _path_of(obj: Any) -> str | None:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    try:
        return f"{module}.{name}" if import_object(f"{module}.{name}") is obj else None
    except ImportError:
        return None


def portable(value: Any) -> Any:
    """``value`` as plain data (primitives, lists, dicts), or None where that is impossible.

    Functions and classes become import paths; instances whose constructor arguments are all
    stored as same-named primitive attributes become ``{"class_path", "init_args"}``.
    """
    if isinstance(value, enum.Enum):
        return portable(value.value)
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Mapping):
        return {str(k): portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [portable(v) for v in value]
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return _path_of(value)
    path = _path_of(type(value))
    if path is None:
        return None
    if hasattr(value, "to_dict") and callable(value.to_dict):  # e.g. peft's LoraConfig
        data = portable(value.to_dict())
        return data if isinstance(data, dict) else None
    try:
        params = [p for p in inspect.signature(type(value)).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return None
    init_args = {}
    for p in params:
        if not hasattr(value, p.name):
            if p.default is inspect.Parameter.empty:
                return None
            continue
        arg = portable(getattr(value, p.name))
        if arg is None and getattr(value, p.name) is not None:
            return None
        init_args[p.name] = arg
    return {"class_path": path, "init_args": init_args}


def as_instance(value: T | Mapping[str, Any], cls: type[T]) -> T:
    """``value`` as a ``cls``: itself, or built from a ``{"class_path", "init_args"}`` spec or a mapping of fields.

    A checkpoint stores a config object as such a spec (see :func:`portable`); a Python caller may write
    the mapping of its fields directly (``sampling={"max_new_tokens": 32}``).
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        built = resolve_callable(value) if "class_path" in value else cls(**value)
        if isinstance(built, cls):
            return built
    raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {value!r}")
