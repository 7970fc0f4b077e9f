"""Conventions every command keeps: --version, defaults in --help, python -m densevit, and defaults that work on
every registered backbone (a stride that is not given suits the backbone)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from densevit.cli.common import resolve_stride
from densevit.models.families import make_adapter
from densevit.models.registry import BACKBONES
from densevit.models.weights import create_model
from densevit.version import __version__

COMMANDS = {"extract": "densevit.cli.extract", "analyze": "densevit.cli.analyze", "coseg": "densevit.apps.cli.coseg",
            "partseg": "densevit.apps.cli.partseg", "match": "densevit.apps.cli.match", "pca": "densevit.apps.cli.pca",
            "discover": "densevit.apps.cli.discover", "vos": "densevit.apps.cli.vos",
            "explore": "densevit.apps.cli.explore", "index": "densevit.apps.cli.index",
            "segment": "densevit.cli.segment"}
REQUIRED = {"vos": ["--frames", "f", "--first-mask", "m.png", "-o", "out"], "explore": []}


def _parser(name: str):
    return importlib.import_module(COMMANDS[name]).build_parser()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_version_and_defaults_in_help(name, capsys):
    p = _parser(name)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    text = p.format_help() if name != "index" else p._subparsers._group_actions[0].choices["build"].format_help()
    assert "(default:" in text


def test_python_dash_m_densevit_runs_every_command():
    out = subprocess.run([sys.executable, "-m", "densevit", "pca", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
    bad = subprocess.run([sys.executable, "-m", "densevit", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr and "coseg" in bad.stderr


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "index"])
def test_every_backbone_works_with_the_default_flags(name):
    """``--backbone X`` and nothing else: the default stride divides X's patch and the model is set up (on the
    meta device: no weights, no compute) with it."""
    argv = REQUIRED.get(name, ["img.jpg", "-o", "out"])
    for backbone, spec in BACKBONES.items():
        args = _parser(name).parse_args(argv + ["--backbone", backbone])
        stride = resolve_stride(args)
        assert spec.patch_size % stride == 0, (name, backbone, stride)
        model = create_model(spec, "meta")
        make_adapter(spec.family, model, spec.pos, spec.patch_size, stride)


def test_dinov2_runs_with_the_default_stride(tmp_path, shared, images):
    """densevit-pca --backbone dinov2_vits14_reg without --stride (it was 4, which does not divide 14)."""
    from densevit.apps.cli import pca

    weights = shared / "golden" / "dinov2_vits14_reg_random_official_fp16.pth"
    code = pca.entry([str(images[0]), "-o", str(tmp_path / "o"), "--backbone", "dinov2_vits14_reg", "--weights",
                      str(weights), "--load-size", "56", "--device", "cpu", "--quiet"])
    assert code == 0 and (tmp_path / "o" / "cat_pca.png").is_file()


def test_missing_weights_advice_is_worded_for_the_command_line(tmp_path, images):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "t"),
           "HF_HOME": str(tmp_path / "h"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "densevit", "extract", str(images[0]), "-o", str(tmp_path / "o"),
                          "--device", "cpu"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--weights" in lines[0] and "weights=" not in lines[0]


def test_extract_says_what_it_wrote(tmp_path, images, golden_path, capsys):
    from densevit.cli import extract

    argv = [str(images[0]), "-o", str(tmp_path / "o"), "--weights", str(golden_path), "--load-size", "48",
            "--device", "cpu"]
    assert extract.entry(argv) == 0
    assert "1 descriptor file(s) written to" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["cat.npz"]          # no temporary file left
