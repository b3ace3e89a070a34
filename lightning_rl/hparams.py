"""Hyperparameters as plain data: import paths, ``{"class_path", "init_args"}`` and ``{"partial", ...}`` mappings.

Checkpoints load with ``torch.load(weights_only=True)``, which refuses pickled Python objects, so
the modules store their hyperparameters (reward functions, callables, config objects such as
:class:`~lightning_rl.rollout.SamplingConfig`) in this form and resolve it back when the module is
rebuilt from a checkpoint (:func:`resolve_callable`, :func:`resolve_factory`, :func:`as_instance`).
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
_PRIMITIVES = (str, int, float, bool, type(None))
#: The key of a stored :class:`functools.partial`: ``{"partial": path, "args": [...], "keywords": {...}}``.
PARTIAL_KEY = "partial"


def import_object(path: str) -> Any:
    """Import ``"package.module.name"`` (attributes after the module allowed).

    Raises:
        ImportError: the path names nothing importable, or its module exists but raised while
            importing (the module's own error is chained and named in the message).
    """
    return _import(path, "reward_funcs=[{name}, ...]) (all of them, in the same order",
                   "'my_package.rewards.my_reward'")


def _import(path: str, again: str, example: str) -> Any:
    """:func:`import_object`, with the hints of its errors.

    Args:
        path: the import path.
        again: how to pass a ``__main__`` object again: the ``load_from_checkpoint`` argument (``{name}`` filled in).
        example: an example import path.
    """
    parts = path.split(".")
    obj: Any = None
    cut = 0
    for n in range(1, len(parts)):  # the longest importable module prefix, shortest first
        name = ".".join(parts[:n])
        try:
            obj = importlib.import_module(name)
        except ImportError as err:
            missing = getattr(err, "name", None)
            if isinstance(err, ModuleNotFoundError) and missing and (name == missing or name.startswith(missing + ".")):
                break  # no such module: the rest are attributes (or the path is wrong)
            raise ImportError(
                f"cannot import {path!r}: importing {name!r} failed: {err}. The module exists but raised while "
                "importing; fix that error (e.g. install the missing dependency) in this environment"
            ) from err
        cut = n
    if cut:
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            pass
        else:
            return obj
    if path.startswith("__main__."):
        name = path[len("__main__."):]
        raise ImportError(
            f"cannot import {path!r}: it was defined in the script that saved the checkpoint (__main__), which this "
            f"process cannot import. Pass it again, e.g. Module.load_from_checkpoint(path, {again.format(name=name)}), "
            "or define it in an importable module so checkpoints can name it"
        )
    raise ImportError(f"cannot import {path!r}: give an import path such as {example}")


def resolve_callable(spec: Any) -> Any:
    """A callable from itself, an import path, or a spec.

    ``{"class_path": ..., "init_args": {...}}`` builds an instance; ``{"partial": ..., "args": [...],
    "keywords": {...}}`` (see :func:`portable`) builds a :class:`functools.partial`.
    """
    if isinstance(spec, str):
        return import_object(spec)
    if isinstance(spec, Mapping) and "class_path" in spec:
        cls = import_object(spec["class_path"])
        return cls(**dict(spec.get("init_args") or {}))
    if isinstance(spec, Mapping) and PARTIAL_KEY in spec:
        return _stored_partial(spec, import_object(spec[PARTIAL_KEY]))
    return spec


def _stored_partial(spec: Mapping[str, Any], func: Any) -> functools.partial:
    """The :class:`functools.partial` a ``{"partial", "args", "keywords"}`` spec stores, of ``func`` (its import)."""
    return functools.partial(func, *(spec.get("args") or ()), **dict(spec.get("keywords") or {}))


def resolve_factory(value: Any, what: str = "optimizer") -> Callable[..., Any] | None:
    """A factory hyperparameter (``optimizer``, ``lr_scheduler``) as a callable, or None when unset.

    Accepts the callable itself, an import path (``"torch.optim.SGD"``, ``"my_pkg.make_optimizer"``),
    a ``{"class_path", "init_args"}`` spec as LightningCLI's ``OptimizerCallable`` takes it (the class
    with those arguments bound, called later with the parameters or optimizer), or a ``{"partial", ...}``
    spec (a stored :class:`functools.partial`). Modules call this on what a checkpoint stored.

    Args:
        value: the stored or given value.
        what: the argument's name, for error messages.

    Raises:
        ImportError: a path that cannot be imported.
        TypeError: a value that is none of the forms above, or resolves to something not callable.
    """
    if value is None or callable(value):
        return value
    example = "'torch.optim.lr_scheduler.StepLR'" if "sched" in what else "'torch.optim.SGD'"
    hints = (f"{what}={{name}}", f"{example} or 'my_package.make_{what}'")
    if isinstance(value, str):
        factory = _import(value, *hints)
    elif isinstance(value, Mapping) and "class_path" in value:
        factory = functools.partial(_import(value["class_path"], *hints), **dict(value.get("init_args") or {}))
    elif isinstance(value, Mapping) and PARTIAL_KEY in value:
        factory = _stored_partial(value, _import(value[PARTIAL_KEY], *hints))
    else:
        raise TypeError(
            f"{what} must be a callable, an import path such as {example}, or a spec such as "
            f"{{'class_path': {example}, 'init_args': {{...}}}}; got {value!r}"
        )
    if not callable(factory):
        raise TypeError(f"{what}={value!r} resolves to {factory!r}, which is not callable: name a class or a "
                        "function that builds it")
    return factory


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
    stored as same-named primitive attributes become ``{"class_path", "init_args"}``. A
    :class:`functools.partial` of an importable class with keyword arguments only (what LightningCLI's
    ``OptimizerCallable`` builds) becomes ``{"class_path", "init_args"}`` too, as LightningCLI writes it
    (:func:`resolve_factory` binds it back); other partials become ``{"partial", "args", "keywords"}``.
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
    if isinstance(value, functools.partial):
        return _portable_partial(value)
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


def _portable_partial(value: functools.partial) -> dict[str, Any] | None:
    """A partial as ``{"class_path", "init_args"}`` or ``{"partial", "args", "keywords"}``, or None."""
    func, args = value.func, list(value.args)
    # LightningCLI (jsonargparse) binds a class as partial(call_without_instantiate_context, instantiator, cls, ...)
    while args and (getattr(func, "__module__", None) or "").split(".")[0] == "jsonargparse":
        func, args = args[0], args[1:]
    path = _path_of(func)
    stored_args, keywords = portable(args), portable(dict(value.keywords))
    lost = [a for a, s in zip(args, stored_args) if s is None and a is not None]
    lost += [k for k, v in value.keywords.items() if keywords[k] is None and v is not None]
    if path is None or lost:
        return None
    if inspect.isclass(func) and not args:
        return {"class_path": path, "init_args": keywords}
    return {PARTIAL_KEY: path, "args": stored_args, "keywords": keywords}


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
