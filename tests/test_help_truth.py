"""Every command's --help tells the truth: each flag's default is stated once, in words (on/off for switches, a
--no-x flag says the step is on, plain lists, no Python reprs), and it is the default of the config the flag comes
from. The usage names the command as it was run; one name per concept (--load-size everywhere)."""
from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys

import pytest

from densevit.__main__ import COMMANDS


def _help(monkeypatch, capsys, module: str, argv=()) -> str:
    monkeypatch.setenv("COLUMNS", "3000")           # one line per flag
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict:
    """``{option string: its invocation and help on one line}`` of every flag of a help text."""
    out, joined = {}, []
    for line in text.splitlines():
        if line.startswith("  -"):
            joined.append(line)
        elif line.startswith("   ") and joined:          # the help below a long invocation
            joined[-1] += "  " + line.strip()
        else:
            joined.append("")
    for line in filter(None, joined):
        invocation = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for part in invocation.split(", "):
            out[part.split()[0]] = line
    return out


def _words(value) -> str:
    """How a default reads: on/off, plain lists, none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _parsers():
    """(command words, module, argv before --help) of every command and sub-command."""
    for name, module in COMMANDS.items():
        if name == "index":
            yield "index build", module, ["build"]
            yield "index search", module, ["search"]
        else:
            yield name, module, []


@pytest.mark.parametrize("name,module,argv", list(_parsers()), ids=[p[0] for p in _parsers()])
def test_every_flag_states_its_default_once_in_words(name, module, argv, monkeypatch, capsys):
    text = _help(monkeypatch, capsys, module, argv)
    parser = importlib.import_module(module).build_parser()
    if argv:
        parser = next(a for a in parser._actions if a.choices and argv[0] in (a.choices or {})).choices[argv[0]]
    lines = _entries(text)
    for action in parser._actions:
        if not action.option_strings or action.help == "==SUPPRESS==" or action.dest in ("help", "version"):
            continue
        line = lines[action.option_strings[0]]
        said = re.findall(r"default: ", line, flags=re.IGNORECASE)
        if action.required:
            assert not said, line
            continue
        assert len(said) == 1, f"{name} {action.option_strings[0]}: default stated {len(said)} times: {line}"
        m = re.search(r"\(default: ([^()]*)\)$", line)
        if m is None or "default:" in (action.help or "").lower():   # the help states it in its own words
            continue
        words = m.group(1)
        assert not re.search(r"[\[\]'{}]|\bTrue\b|\bFalse\b|\bNone\b|^\(", words), f"{name}: repr in {line}"
        if action.const is False:                        # a --no-x flag: the step it skips is on by default
            assert words.endswith(" on" if action.default else " off"), line
        elif isinstance(action.default, bool):
            assert words == _words(action.default), line
        else:
            assert words == _words(action.default), line


def _config_flags():
    from densevit.apps.correspondence import CorrespondenceConfig
    from densevit.apps.coseg import CosegConfig
    from densevit.apps.discovery.core import DiscoverConfig
    from densevit.apps.partseg import PartsegConfig
    from densevit.apps.pca import PCAConfig
    from densevit.apps.vos import VOSConfig

    return [("coseg", CosegConfig), ("partseg", PartsegConfig), ("pca", PCAConfig), ("match", CorrespondenceConfig),
            ("discover", DiscoverConfig), ("vos", VOSConfig)]


@pytest.mark.parametrize("name,cls", _config_flags(), ids=[n for n, _ in _config_flags()])
def test_help_defaults_are_the_configs_defaults(name, cls, monkeypatch, capsys):
    from densevit.cli.flags import flag_name

    lines = _entries(_help(monkeypatch, capsys, COMMANDS[name]))
    checked = 0
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or f.metadata.get("positional"):
            continue
        flag = flag_name(f)
        if f.metadata.get("invert"):
            flag = "--no-" + flag[2:]
        if flag not in lines:           # a command may leave a field out (e.g. --method in vos)
            continue
        line = lines[flag]
        m = re.search(r"\(default: ([^()]*)\)$", line)
        if m is None or "default:" in f.metadata.get("help", "").lower():
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if name == "discover" and f.name == "load_size":
            default = 0                                   # the command's own default: the original size
        if f.metadata.get("invert"):
            assert m.group(1).endswith(" on" if default else " off"), line
        else:
            assert m.group(1) == _words(default), line
        checked += 1
    assert checked >= 5


def test_known_cases(monkeypatch, capsys):
    coseg = _entries(_help(monkeypatch, capsys, COMMANDS["coseg"]))
    assert coseg["--no-grabcut"].endswith("(default: grabcut on)")
    assert coseg["--bin"].endswith("(default: off)")
    assert coseg["--seed"].count("default") == 1 and coseg["--seed"].endswith("(default: 1234)")
    assert coseg["--grabcut-seed"].endswith("(default: 0)")
    vos = _help(monkeypatch, capsys, COMMANDS["vos"])
    lines = _entries(vos)
    assert lines["--no-minmax-norm"].endswith("(default: minmax-norm on)")
    assert lines["--discover-no-binary-graph"].endswith("(default: discover-binary-graph on)")
    assert "--load-size" in lines and "--short-side" not in vos
    disc = _entries(_help(monkeypatch, capsys, COMMANDS["discover"]))
    assert disc["--load-size"].endswith("(default: 0)") and disc["--backbone"].endswith("(default: dino_vits8)")
    part = _entries(_help(monkeypatch, capsys, COMMANDS["partseg"]))
    assert part["--num-crop-augmentations"].endswith("(default: 0)")
    match = _entries(_help(monkeypatch, capsys, COMMANDS["match"]))
    assert re.search(r"\(default: \d+\)$", match["--seed"])
    analyze = _entries(_help(monkeypatch, capsys, COMMANDS["analyze"]))
    assert analyze["--analyses"].endswith("(default: attention cka)")
    assert analyze["--compare"].endswith("(default: none)")


def test_old_vos_flag_still_parses():
    from densevit.apps.cli.vos import build_parser

    base = ["--frames", "f", "--first-mask", "m.png", "-o", "o"]
    assert build_parser().parse_args(base + ["--short-side", "64"]).short_side == 64
    assert build_parser().parse_args(base + ["--load-size", "96"]).short_side == 96


def test_usage_names_the_command_as_run():
    out = subprocess.run([sys.executable, "-m", "densevit", "pca", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m densevit pca "), out.stdout[:200]


def test_list_backbones_columns_align(capsys):
    from densevit.cli.extract import main

    assert main(["--list-backbones"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.strip()]
    assert len(rows) > 10
    assert len({r.index(" patch ") for r in rows}) == 1, rows
