"""A config the CLI's parser refuses, in a few lines: the key, what is wrong, and the nearest accepted names.

jsonargparse reports a misspelled key of a class's arguments (``num_generation`` for ``num_generations``) after the
whole usage (45 lines) and a dump of every value given, with the statement that matters in the middle of it.
:func:`explain_parse_error` reads that message's structure (``Parser key "model"``, ``Problem with given
class_path '...'``, nested keys, the statement) and writes the config key it concerns, the statement, and the
accepted names closest to a misspelled one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import typing
from collections.abc import Iterable

from lightning_rl.cli_errors import TRACEBACK_ENV, _init_arguments

_PARSER_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":(.*)$')
_CLASS_PATH = re.compile(r"^\s*- Problem with given class_path '([^']+)':\s*$")
_NOISE = re.compile(r"^\s*(Subtypes:|Errors:|Given value|Does not validate against any of the Union subtypes|"
                    r"- Expected a)")
_UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_UNKNOWN_IN_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_UNKNOWN_IN_SUBCOMMAND = re.compile(r"Subcommand '([^']+)' does not accept option '([^']+)'")
_NO_ATTRIBUTE = re.compile(r"module '([^']+)' has no attribute '([^']+)'")
_REQUIRED = re.compile(r"the following arguments are required: (.+)$")


def explain_parse_error(message: str, prog: str, subcommand_options: Iterable[str] = ()) -> str:
    """The lines the CLI prints for a config its parser refused (instead of the usage and the values' dump).

    Args:
        message: jsonargparse's error message.
        prog: the command as the user typed it (``python -m lightning_rl``), for the ``--help`` hint.
        subcommand_options: the subcommand's option keys (``trainer.max_steps``, ...), for a misspelled one.
    """
    keys, class_path, statement = _parse(message)
    key = ".".join(keys)
    hint = ""
    if m := _UNKNOWN_OPTION.search(statement):
        name = m.group(1)
        key = f"{key}.{name}" if key else name
        statement = f"{class_path or 'this class'} has no argument {name!r}"
        hint = _nearest(name, _arguments_of(class_path))
    elif m := _UNKNOWN_IN_GROUP.search(statement):
        group, name = m.groups()
        key = f"{key}.{group}.{name}" if key else f"{group}.{name}"
        statement = f"{group!r} has no field {name!r}"
        hint = _nearest(name, _group_fields(class_path, group))
    elif m := _UNKNOWN_IN_SUBCOMMAND.search(statement):
        key = m.group(2)
        statement = f"`{m.group(1)}` has no option {key!r}"
        hint = _nearest(key, subcommand_options)
        if not prog.endswith(f" {m.group(1)}"):
            prog = f"{prog} {m.group(1)}"
    elif m := _NO_ATTRIBUTE.search(statement):
        module, name = m.groups()
        key = ".".join([*(keys[:-1] if keys[-1:] == ["init_args"] else keys), "class_path"])
        statement = f"{module} has no {name!r}"
        hint = _nearest(name, _public_names(module))
    elif m := _REQUIRED.search(statement):  # "fit.model": the subcommand's options list it
        missing = [k.strip() for k in m.group(1).split(",")]
        subcommand = missing[0].split(".", 1)[0] if "." in missing[0] else ""
        keys = [k.removeprefix(f"{subcommand}.") if subcommand else k for k in missing]
        statement = f"the config gives no {', '.join(repr(k) for k in keys)}"
        if subcommand and not prog.endswith(f" {subcommand}"):
            prog = f"{prog} {subcommand}"
        if any(k.endswith(".model") for k in missing):
            statement += " (a module: model: {class_path: lightning_rl.GRPO, init_args: {...}}, as in examples/)"
    where = f"{key}: " if key else ""
    return (f"error: {where}{statement}{hint}\n"
            f"(`{prog} --help` lists the accepted options; jsonargparse's whole message: set {TRACEBACK_ENV}=1)")


def _parse(message: str) -> tuple[list[str], str | None, str]:
    """``(the config keys down to the error, the innermost class_path, the statement)`` of a jsonargparse message.

    ``Parser key "model"`` then ``Problem with given class_path 'lightning_rl.GRPO'`` then ``Parser key
    "num_generations"`` is ``model.init_args.num_generations``; the statement is the first line that is neither
    a key, a class nor the message's frame (the Union's subtypes, the values given).
    """
    keys: list[str] = []
    class_path = None
    for line in message.splitlines():
        if m := _PARSER_KEY.match(line):
            keys.append(m.group(1))
            if m.group(2).strip():
                return keys, class_path, m.group(2).strip()
        elif m := _CLASS_PATH.match(line):
            class_path = m.group(1)
            keys.append("init_args")
        elif line.strip() and not _NOISE.match(line):
            return keys, class_path, line.strip()
    return keys, class_path, message.strip().splitlines()[0] if message.strip() else "the config was refused"


def _imported_class(class_path: str | None) -> type | None:
    """The class ``class_path`` names, or None when it cannot be imported."""
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) else None


def _arguments_of(class_path: str | None) -> list[str]:
    """The constructor arguments of ``class_path`` and its bases; empty when it cannot be imported."""
    cls = _imported_class(class_path)
    return [] if cls is None else _init_arguments(cls)


def _group_fields(class_path: str | None, group: str) -> list[str]:
    """The fields of the dataclass that ``class_path``'s argument ``group`` takes (``sampling``: SamplingConfig)."""
    cls = _imported_class(class_path)
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        try:
            hint = typing.get_type_hints(init).get(group) if init is not None else None
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: no suggestion
            continue
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t):
                return [f.name for f in dataclasses.fields(t)]
    return []


def _public_names(module: str) -> list[str]:
    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return []


def _nearest(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the accepted names closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=2, cutoff=0.75)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


__all__ = ["explain_parse_error"]
