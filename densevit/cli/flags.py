"""Command-line flags generated from a config dataclass, so a parameter is written once (its field, with the
help text in the field's metadata): :func:`add_config_flags` adds the flags, :func:`config_from_args` builds the
config back from the parsed arguments.

Metadata keys of a field (all optional): ``help``, ``choices``, ``flag`` (the option string; default
``--field-name``), ``aliases`` (more option strings), ``cli`` (False: no flag for this field)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, Iterable, Optional, Tuple, Type

__all__ = ["add_config_flags", "config_from_args", "flag_name"]


def flag_name(f: dataclasses.Field) -> str:
    """The option string of a field: ``metadata["flag"]`` or ``--`` + the field name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap(tp: Any) -> Tuple[Any, bool]:
    """``(inner type, optional)`` of ``Optional[T]``; other types unchanged."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _kwargs(f: dataclasses.Field, tp: Any, default: Any) -> Dict[str, Any]:
    """argparse keyword arguments of one field (type, nargs, bool action, choices, help, default)."""
    inner, _ = _unwrap(tp)
    kw: Dict[str, Any] = {"default": default, "dest": f.name}
    if "help" in f.metadata:
        kw["help"] = f.metadata["help"]
    if "choices" in f.metadata:
        kw["choices"] = list(f.metadata["choices"])
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction if f.metadata.get("negatable", True) else "store_true"
        return kw
    if typing.get_origin(inner) in (tuple, list):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        kw["nargs"] = "+" if Ellipsis in typing.get_args(inner) or typing.get_origin(inner) is list else len(args)
        if args and args[0] in (int, float, str):
            kw["type"] = args[0]
        return kw
    if inner in (int, float, str):
        kw["type"] = inner
    return kw


def add_config_flags(parser: "argparse._ActionsContainer", cls: Type, *, only: Optional[Iterable[str]] = None,
                     skip: Iterable[str] = (), defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add one flag per field of the dataclass ``cls`` (or of the fields named in ``only``), default the field's
    default (or ``defaults[name]``), help and choices from the field's metadata."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or f.name in skip or (wanted is not None and f.name not in wanted):
            continue
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        parser.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **_kwargs(f, hints[f.name], default))


def config_from_args(cls: Type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the parsed arguments: every field that has a flag in ``args`` (tuples made tuples),
    then ``overrides``; fields without a flag keep their defaults."""
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        inner, _ = _unwrap(hints[f.name])
        if v is not None and typing.get_origin(inner) is tuple:
            v = tuple(v)
        values[f.name] = v
    values.update(overrides)
    return cls(**values)
