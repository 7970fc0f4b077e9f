"""Every third-party module the package imports is a declared requirement (setup.cfg), core or extra."""
from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: Path) -> Dict[str, Set[str]]:
    """Top-level module name -> files importing it (every import statement, in functions too)."""
    found: Dict[str, Set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party(found: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m != "densevit"}


def _requirement_names(text: str) -> Set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(_norm(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> Dict[str, Set[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {"install_requires": _requirement_names(cfg["options"]["install_requires"])}
    for extra, text in cfg["options.extras_require"].items():
        out[extra] = _requirement_names(text)
    return out


def _distributions(module: str) -> Set[str]:
    return {_norm(d) for d in metadata.packages_distributions().get(module, [])}


def _undeclared(found: Dict[str, Set[str]], allowed: Set[str]) -> Dict[str, Set[str]]:
    return {m: files for m, files in found.items() if not _distributions(m) & allowed}


def test_package_imports_are_declared():
    declared = _declared()
    allowed = set().union(*declared.values())
    found = _third_party({**_imports(ROOT / "densevit"), **_imports(ROOT / "apps")})
    assert "torch" in found and "scipy" in found          # the scan sees the package's imports
    missing = _undeclared(found, allowed)
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_core_modules_import_only_core_requirements():
    """The library layer (densevit/, not its optional analysis plots) needs nothing from an extra."""
    declared = _declared()
    core = declared["install_requires"]
    found = _third_party(_imports(ROOT / "densevit"))
    found = {m: {f for f in files if "analysis/plots" not in f} for m, files in found.items()}
    missing = _undeclared({m: f for m, f in found.items() if f}, core)
    assert not missing, f"library modules import optional requirements: {missing}"


def test_tests_imports_are_in_dev_or_explore():
    declared = _declared()
    allowed = declared["install_requires"] | declared["dev"] | declared["explore"]
    found = _third_party(_imports(ROOT / "tests"))
    for local in (ROOT / "tests").glob("*.py"):          # the suite's own helper modules (conftest, ...)
        found.pop(local.stem, None)
    missing = _undeclared(found, allowed)
    assert not missing, f"tests import packages outside install_requires/dev/explore: {missing}"


def test_an_undeclared_import_is_caught():
    with pytest.raises(AssertionError):
        missing = _undeclared({"scipy": {"apps/discovery/core.py"}}, {"numpy", "torch"})
        assert not missing
