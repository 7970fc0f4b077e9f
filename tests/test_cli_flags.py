"""Flags generated from a config dataclass (densevit.cli.flags): one flag per field, default the field's, help
and choices from the metadata, and the config built back from the parsed arguments."""
import argparse
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

import pytest

from densevit.cli.flags import add_config_flags, config_from_args, flag_name


@dataclass(frozen=True)
class Toy:
    num_parts: int = field(default=4, metadata={"help": "number of parts"})
    thresh: float = 0.065
    crf: str = field(default="auto", metadata={"choices": ("auto", "dense", "none")})
    bin: bool = False
    cap: Optional[int] = 256
    k_range: Tuple[int, ...] = tuple(range(1, 4))
    size: Tuple[int, int] = (2, 3)
    out: str = field(default="x", metadata={"flag": "--out", "aliases": ("-o",)})
    hidden: int = field(default=7, metadata={"cli": False})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, Toy)
    return p


def test_every_field_has_its_flag_and_default():
    p = parser()
    by_dest = {a.dest: a for a in p._actions}
    for f in fields(Toy):
        if f.name == "hidden":
            assert f.name not in by_dest
            continue
        assert flag_name(f) in by_dest[f.name].option_strings
        assert by_dest[f.name].default == f.default
    assert sorted(by_dest["out"].option_strings) == ["--out", "-o"]
    assert config_from_args(Toy, p.parse_args([])) == Toy()


def test_parsed_values_build_the_config():
    args = parser().parse_args(["--num-parts", "6", "--bin", "--cap", "9", "--k-range", "2", "5", "--size", "4",
                                "5", "-o", "y", "--crf", "none"])
    cfg = config_from_args(Toy, args, thresh=0.5)
    assert cfg == Toy(num_parts=6, bin=True, cap=9, k_range=(2, 5), size=(4, 5), out="y", crf="none", thresh=0.5)
    assert parser().parse_args(["--no-bin"]).bin is False


def test_choices_and_help_come_from_the_metadata(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--crf", "bad"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "number of parts (default: 4)" in text
