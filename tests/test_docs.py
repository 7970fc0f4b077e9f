"""Every command the README and the documentation site show is checked: its flags parse with the command's own
parser, and the quick ones (on the shared images, the golden weights) run and write what the page says. The
site itself is built with ``mkdocs build --strict`` in ``.ci/run`` (broken links, anchors, API names)."""
from __future__ import annotations

import importlib
import re
import shlex

import pytest

from densevit.__main__ import COMMANDS
from densevit.io.paths import golden_weights, repo_root, shared_dir

ROOT = repo_root()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNS = {"extract", "coseg", "partseg", "match", "pca", "vos"}      # quick on the golden weights


def _commands():
    """``(page, command line)`` of every densevit command in a bash (or untagged) fence of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip()
                if re.match(r"(densevit-\w+|python -m densevit |torchrun .*-m densevit\.cli\.(extract|index))", line):
                    found.append((page.name, line))
    return found


def _argv(line: str):
    """``(command name, argv)``: comments and ``[optional]`` synopsis groups left out."""
    line = re.sub(r"\s\[[^\]]*\](?=\s|$)", " ", line)                   # [--kind flat|...] in a synopsis
    words = shlex.split(line, comments=True)
    if words[0] == "torchrun":
        module = next(w for w in words if w.startswith("densevit.cli."))
        return module.removeprefix("densevit.cli."), words[words.index(module) + 1:]
    if words[0] == "python":
        return words[3], words[4:]
    return words[0].removeprefix("densevit-"), words[1:]


COMMAND_LINES = _commands()


def test_the_pages_show_commands():
    names = {_argv(line)[0] for _, line in COMMAND_LINES}
    assert {"extract", "coseg", "partseg", "match", "pca", "vos", "discover", "index", "explore"} <= names


@pytest.mark.parametrize("page,line", COMMAND_LINES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMAND_LINES)])
def test_every_documented_command_parses(page, line, capsys):
    name, argv = _argv(line)
    assert name in COMMANDS, f"{page}: unknown command in {line!r}"
    parser = importlib.import_module(COMMANDS[name]).build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page}: {line!r} does not parse: {capsys.readouterr().err.strip()}")


def _runnable():
    out, seen = [], set()
    for page, line in COMMAND_LINES:
        if line in seen:            # the same command on two pages runs once
            continue
        seen.add(line)
        name, argv = _argv(line)
        shared = [a for a in argv if a.startswith("../shared/")]
        if name in RUNS and shared and not any(re.fullmatch(r"[A-Z_]+\.*/?|.*\.\.\.", a) for a in argv):
            out.append((page, line))
    return out


@pytest.mark.parametrize("page,line", _runnable(), ids=[p for p, _ in _runnable()])
def test_quick_documented_commands_run(page, line, tmp_path, one_thread):
    name, argv = _argv(line)
    fixed = []
    for a in argv:
        if a.startswith("../shared/"):
            a = str(shared_dir() / a.removeprefix("../shared/"))
        elif a.startswith("out/"):
            a = str(tmp_path / a)
        fixed.append(a)
    if "--weights" not in fixed:
        fixed += ["--weights", str(golden_weights())]
    if "--load-size" not in fixed:
        fixed += ["--load-size", "64"]       # the same command, smaller
    fixed += ["--device", "cpu"]
    entry = importlib.import_module(COMMANDS[name]).entry
    assert entry(fixed) == 0, f"{page}: {line!r}"
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written, f"{page}: {line!r} wrote nothing"


def _benchmark_lines():
    """``(page, script, argv)`` of every ``python benchmarks/X.py ...`` line of the pages."""
    found = []
    for page in PAGES:
        for lang, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", page.read_text()):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                m = re.match(r"\s*(?:\w+=\S+\s+)*(?:python|torchrun .*?) (benchmarks/\w+\.py)(.*)$", line)
                if m:
                    argv = shlex.split(re.sub(r"\s\[[^\]]*\](?=\s|$)", " ", m.group(2)), comments=True)
                    found.append((page.name, m.group(1), [a for a in argv if a != "..."]))
    return found


BENCH_LINES = _benchmark_lines()


@pytest.mark.parametrize("page,script,argv", BENCH_LINES, ids=[f"{p}:{s}:{i}" for i, (p, s, _) in
                                                              enumerate(BENCH_LINES)])
def test_documented_benchmark_lines_parse(page, script, argv, capsys):
    import importlib.util

    path = ROOT / script
    assert path.is_file(), f"{page}: {script} does not exist"
    source = path.read_text()
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    if "def build_parser" in source:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: {script} {argv} does not parse: {capsys.readouterr().err.strip()}")
    else:                               # a script whose parser is built inside main: every flag it is shown with
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert f'"{flag}"' in source, f"{page}: {script} has no flag {flag}"


def test_the_readme_python_runs(monkeypatch, one_thread):
    """The front page's Python example, as printed (run from the clone's root, ../shared beside it)."""
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"(?ms)^```python\n(.*?)^```", (ROOT / "README.md").read_text())
    assert blocks
    for code in blocks:
        scope: dict = {}
        code = code.replace("../shared/", f"{shared_dir()}/")        # wherever DENSEVIT_SHARED points
        exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["desc"].shape) == (scope["grid"].num_tokens, 384)
