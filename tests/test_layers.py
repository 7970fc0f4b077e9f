"""The package's folders are layers: no module imports from a layer above its own, and there is no import cycle.

Lowest first (README, Architecture): errors, runtime, io, models, upsample, features, compat, matching, storage,
apps, eval, commands (``densevit.cli`` and ``densevit.apps.cli``), then the package's front door
``densevit/__init__.py``.
Every import counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("errors", ["densevit.errors", "densevit.version", "densevit.options"]),
    ("runtime", ["densevit.runtime"]),
    ("io", ["densevit.io"]),
    ("models", ["densevit.models"]),
    ("upsample", ["densevit.upsample"]),
    ("features", ["densevit.features"]),
    ("compat", ["densevit.compat"]),
    ("matching", ["densevit.matching"]),
    ("storage", ["densevit.storage"]),
    ("apps", ["densevit.apps"]),
    ("eval", ["densevit.eval"]),
    ("commands", ["densevit.cli", "densevit.apps.cli", "densevit.__main__"]),
    ("package", ["densevit"]),
]


def _modules() -> Dict[str, Path]:
    out = {}
    for top, prefix in (("densevit", ["densevit"]), ("apps", ["densevit", "apps"])):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(prefix + parts)] = path
    return out


def layer_of(module: str) -> Optional[int]:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def _imports(module: str, path: Path, known: Set[str]) -> List[str]:
    """Package modules imported by ``module`` (``from x import y`` counts ``x.y`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = base[: len(base) - (node.level - 1)]
                target = ".".join(head + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        found += [t for t in targets if t == "densevit" or t.startswith("densevit.")]
    return found


def _graph():
    mods = _modules()
    known = set(mods)
    return mods, {m: sorted(set(_imports(m, p, known))) for m, p in mods.items()}


def test_every_module_has_a_layer():
    real, _ = _graph()
    assert {m for m in real if layer_of(m) is None} == set()


def test_no_import_from_a_higher_layer():
    _, graph = _graph()
    bad = []
    for m, targets in graph.items():
        for t in targets:
            if t not in graph:
                bad.append(f"{m} imports {t}, which is no module of the package")
            elif layer_of(t) is not None and layer_of(t) > layer_of(m):
                bad.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not bad, "\n".join(bad)


def _cycles(graph: Dict[str, List[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    _, graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the modules themselves
    flat = {m: [t for t in ts if not (m.startswith(t + ".") and t in graph)] for m, ts in graph.items()}
    assert _cycles(flat) == []


@pytest.mark.parametrize("graph, cyclic", [({"a": ["b"], "b": ["a"]}, True), ({"a": ["b"], "b": []}, False)])
def test_the_cycle_check_finds_cycles(graph, cyclic):
    assert bool(_cycles(graph)) == cyclic
