"""Command-line flags generated from config dataclasses, so a parameter is written once: its field, with its help
text in the field's metadata (:func:`densevit.options.opt`). :func:`add_config_flags` adds the flags, :func:`config_from_args`
builds the config back from the parsed arguments, :func:`make_parser` is every command's parser (defaults shown in
``--help``, ``--version``).

Metadata keys of a field (all optional): ``help``; ``choices``; ``flag`` (the option string; default
``--field-name``); ``aliases`` (more option strings); ``cli`` (False: no flag); ``negatable`` (bool fields:
True (default) gives ``--x/--no-x``, False a plain ``--x``); ``invert`` (bool fields whose flag is ``--no-x``:
given, the field is False); ``parse`` (a function applied to the parsed value, e.g. :func:`densevit.options.zero_is_none`);
``type``, ``nargs``, ``metavar``, ``required``, ``action`` (``"append"``), ``positional`` (True: an argument
without dashes); ``hidden_aliases`` (old option strings, still accepted, left out of ``--help``).

Every flag added here remembers that it was given (``args.given``, a frozenset of destinations), so a command
can tell a value typed on the command line from a default (e.g. flags that must agree with a feature store)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type

from ..version import __version__

__all__ = ["add_config_flags", "config_from_args", "flag_name", "make_parser", "HelpFormatter", "default_words",
           "command_name"]

_MISSING = dataclasses.MISSING


def flag_name(f: dataclasses.Field, prefix: str = "", meta: Optional[Mapping[str, Any]] = None) -> str:
    """The option string of a field: ``metadata["flag"]`` or ``--`` + the field name with dashes, after
    ``--`` + ``prefix``."""
    name = (f.metadata if meta is None else meta).get("flag") or "--" + f.name.replace("_", "-")
    return "--" + prefix + name[2:] if prefix and name.startswith("--") else name


def _dest(f: dataclasses.Field, prefix: str) -> str:
    return prefix.replace("-", "_") + f.name


def _unwrap(tp: Any) -> Tuple[Any, bool]:
    """``(inner type, optional)`` of ``Optional[T]``; other types unchanged."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _recording(cls: type) -> type:
    """``cls`` (an argparse action) that also adds its destination to ``namespace.given``."""

    class Given(cls):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            super().__call__(parser, namespace, values, option_string)
            namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}

    Given.__name__ = f"Given{cls.__name__}"
    return Given


_STORE = _recording(argparse._StoreAction)
_CONST = _recording(argparse._StoreConstAction)
_APPEND = _recording(argparse._AppendAction)
_BOOL = _recording(argparse.BooleanOptionalAction)


def _kwargs(f: dataclasses.Field, tp: Any, default: Any, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """argparse keyword arguments of one field (action, type, nargs, choices, help, default)."""
    inner, _ = _unwrap(tp)
    kw: Dict[str, Any] = {"default": default, "help": meta.get("help") or None}
    for key in ("choices", "metavar", "required"):
        if key in meta:
            kw[key] = list(meta[key]) if key == "choices" else meta[key]
    if inner is bool:
        if meta.get("invert"):
            kw.update(action=_CONST, const=not default)
        elif meta.get("negatable", True):
            kw["action"] = _BOOL
        else:
            kw.update(action=_CONST, const=True)
        return kw
    kw["action"] = _APPEND if meta.get("action") == "append" else _STORE
    if typing.get_origin(inner) in (tuple, list):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        kw["nargs"] = "+" if Ellipsis in typing.get_args(inner) or typing.get_origin(inner) is list else len(args)
        if args and args[0] in (int, float, str):
            kw["type"] = args[0]
    elif inner in (int, float, str):
        kw["type"] = inner
    for key in ("type", "nargs"):
        if key in meta:
            kw[key] = meta[key]
    return kw


def add_config_flags(parser: "argparse._ActionsContainer", cls: Type, *, title: Optional[str] = None,
                     prefix: str = "", only: Optional[Iterable[str]] = None, skip: Iterable[str] = (),
                     defaults: Optional[Mapping[str, Any]] = None,
                     tweak: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
    """Add one flag per field of the dataclass ``cls`` (or of the fields named in ``only``): default the field's
    default (or ``defaults[name]``), help, choices and the rest from its metadata (updated by ``tweak[name]``);
    in a group named ``title`` if given; option strings and destinations after ``prefix`` (e.g. ``"discover-"``)."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else list(only)
    defaults, tweak = defaults or {}, tweak or {}
    target = parser.add_argument_group(title) if title else parser
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in wanted if wanted is not None else list(fields):
        f = fields[name]
        meta = {**f.metadata, **tweak.get(name, {})}
        if meta.get("cli") is False or name in skip:
            continue
        if name in defaults:
            default = defaults[name]
        elif f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        kw = _kwargs(f, hints[name], default, meta)
        if meta.get("flag", "").startswith("--") and kw["action"] in (_STORE, _APPEND) \
                and "metavar" not in kw and "choices" not in kw:      # named after the flag, not the field
            kw["metavar"] = flag_name(f, prefix, meta)[2:].upper().replace("-", "_")
        if meta.get("positional"):
            kw.pop("required", None)
            target.add_argument(_dest(f, prefix), **kw)
        else:
            target.add_argument(*meta.get("short", ()), flag_name(f, prefix, meta),
                                *meta.get("aliases", ()), dest=_dest(f, prefix), **kw)
            hidden = ["--" + prefix + a[2:] for a in meta.get("hidden_aliases", ())]
            if hidden:                  # an old name, still accepted, not shown in --help
                target.add_argument(*hidden, dest=_dest(f, prefix), **{**kw, "help": argparse.SUPPRESS})


def config_from_args(cls: Type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the parsed arguments: every field that has a flag in ``args`` (after its ``parse``
    function; tuples made tuples), then ``overrides``; fields without a flag keep their defaults."""
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = _dest(f, prefix)
        if f.name in overrides or not f.init or not hasattr(args, dest):
            continue
        v = getattr(args, dest)
        inner, _ = _unwrap(hints[f.name])
        if v is not None and typing.get_origin(inner) is tuple:
            v = tuple(v)
        if "parse" in f.metadata:
            v = f.metadata["parse"](v)
        values[f.name] = v
    values.update(overrides)
    return cls(**values)


def default_words(action: argparse.Action) -> Optional[str]:
    """How ``--help`` states the default of ``action`` in words, or None where it states none (positional and
    required arguments, ``--help``/``--version``): switches ``on``/``off`` (a ``--no-x`` flag: ``x on``), lists
    as plain words (``none`` when empty), None as ``none``."""
    if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    d = action.default
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if d else "off"
    if isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):
        if action.const is False:                    # a --no-x flag: given, the step is off
            name = next(o for o in action.option_strings if o.startswith("--"))[2:]
            name = name.replace("no-", "", 1)
            return f"{name} on" if d else f"{name} off"
        return "on" if d else "off"
    if d is None:
        return "none"
    if isinstance(d, (list, tuple)):
        return " ".join(map(str, d)) if d else "none"
    return str(d)


_STATES_DEFAULT = re.compile(r"\bdefault:", re.IGNORECASE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every flag's default in words (:func:`default_words`; where a help text states its default
    itself, ``(default: ...)``, that text alone) and the description's own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        words = default_words(action)
        if words is None or _STATES_DEFAULT.search(text):
            return text
        return f"{text} (default: {words.replace('%', '%%')})" if text else f"default: {words.replace('%', '%%')}"


def command_name(prog: str) -> str:
    """``densevit-NAME`` as the user typed it: ``python -m densevit NAME`` when run through ``python -m
    densevit``, else the console script's name."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "__main__.py" and argv0.parent.name == "densevit" \
            and prog.startswith("densevit-"):
        return "python -m densevit " + prog.removeprefix("densevit-")
    return prog


def make_parser(prog: str, description: Optional[str] = None, **kw: Any) -> argparse.ArgumentParser:
    """The parser of a densevit command: defaults shown in ``--help``, ``--version``; run as ``python -m densevit
    NAME``, its usage says so (not the console script's name)."""
    prog = command_name(prog)
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kw)
    p.add_argument("--version", action="version", version=f"{prog} (densevit) {__version__}")
    return p
