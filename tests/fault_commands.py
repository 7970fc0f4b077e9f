"""Every densevit command as the fault tests run it: small real inputs (shrunk copies of the shared photographs
and DAVIS frames), the golden random weights, small load sizes, and one output location ``out`` per run.

:data:`COMMANDS` is the table the fault harness (``tests/test_fault_harness.py``) runs through every fault;
extend it (or :func:`run`) for other faults (e.g. ``tests/test_fault_inputs.py``). A :class:`Command` builds its
argument list from the :class:`World` (the inputs) and the output location, and names the input it reads most
(the folder a symbolic link would lead an output into)."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

LOAD = "32"


@dataclass
class World:
    """The inputs every command reads: ``imgs`` (two photographs), ``frames`` + ``mask`` (three DAVIS frames and
    the first frame's mask), ``store`` (a feature store of ``imgs``, with saliency) and ``index`` (over it)."""

    root: Path
    weights: Path
    imgs: Path
    frames: Path
    mask: Path
    store: Path
    index: Path

    @property
    def inputs(self) -> List[Path]:
        return [self.imgs, self.frames, self.mask, self.store, self.index]

    def model(self) -> List[str]:
        return ["--weights", str(self.weights), "--device", "cpu"]


@dataclass(frozen=True)
class Command:
    """One command: ``name`` (its console script), ``argv(world, out)``, whether ``out`` is a folder or a file,
    and ``target(world)``: the input folder (or file) a symbolic-link fault points ``out`` at."""

    name: str
    argv: Callable[[World, Path], List[str]]
    target: Callable[[World], Path]
    out_is_file: bool = False
    script: str = ""

    @property
    def id(self) -> str:
        return self.name

    @property
    def entry(self) -> Callable:
        return console_entry(self.script or self.name.split(":")[0])


def console_script(script: str):
    """The entry point of a console script."""
    return next(ep for ep in entry_points(group="console_scripts") if ep.name == script)


def console_entry(script: str) -> Callable:
    """The function a console script runs (wherever its module lives)."""
    return console_script(script).load()


def _sets(w: World, out: Path) -> List[str]:
    return [str(w.imgs), "--out", str(out), *w.model(), "--load-size", LOAD, "--stride", "8", "--quiet"]


COMMANDS: List[Command] = [
    Command("densevit-extract", lambda w, o: [str(w.imgs), "-o", str(o), *w.model(), "--load-size", LOAD,
                                              "--stride", "8"], lambda w: w.imgs),
    Command("densevit-extract:store", lambda w, o: [str(w.imgs), "--store", str(o), *w.model(), "--load-size", LOAD,
                                                    "--stride", "8", "--quiet", "--workers", "0"], lambda w: w.imgs),
    Command("densevit-extract:stats", lambda w, o: [str(w.imgs), "--store", str(w.root / "stats_store"), *w.model(),
                                                    "--load-size", LOAD, "--stride", "8", "--quiet", "--workers", "0",
                                                    "--stats", str(o)],
            lambda w: w.imgs / "a.jpg", out_is_file=True),
    Command("densevit-coseg", lambda w, o: _sets(w, o), lambda w: w.imgs),
    Command("densevit-partseg", lambda w, o: _sets(w, o) + ["--num-parts", "2", "--crf", "none"], lambda w: w.imgs),
    Command("densevit-match", lambda w, o: _sets(w, o) + ["--num-pairs", "4"], lambda w: w.imgs),
    Command("densevit-pca", lambda w, o: _sets(w, o), lambda w: w.imgs),
    Command("densevit-discover", lambda w, o: _sets(w, o) + ["--backbone", "dino_vits8"], lambda w: w.imgs),
    Command("densevit-vos", lambda w, o: ["--frames", str(w.frames), "--first-mask", str(w.mask), "--out", str(o),
                                          *w.model(), "--short-side", LOAD, "--quiet"], lambda w: w.frames),
    Command("densevit-vos:gif", lambda w, o: ["--frames", str(w.frames), "--first-mask", str(w.mask), "--out",
                                              str(w.root / "vos_masks"), "--overwrite", "--gif", str(o), *w.model(),
                                              "--short-side", LOAD, "--quiet"],
            lambda w: w.frames / "00000.jpg", out_is_file=True),
    Command("densevit-vos:video", lambda w, o: ["--frames", str(w.frames), "--first-mask", str(w.mask), "--out",
                                                str(w.root / "vos_masks"), "--overwrite", "--video", str(o),
                                                *w.model(), "--short-side", LOAD, "--quiet"],
            lambda w: w.frames / "00000.jpg", out_is_file=True),
    Command("densevit-index:build", lambda w, o: ["build", str(w.store), "-o", str(o), "--quiet"], lambda w: w.store),
    Command("densevit-index:build-on-disk", lambda w, o: ["build", str(w.store), "-o", str(o), "--on-disk",
                                                          "--quiet"], lambda w: w.store),
    Command("densevit-index:search", lambda w, o: ["search", str(w.index), "--image", "a.jpg", "--point", "10,10",
                                                   "-k", "3", "--out", str(o)], lambda w: w.imgs),
    Command("densevit-segment", lambda w, o: [str(w.imgs), "-o", str(o), *w.model(), "--load-size", LOAD, "--stride",
                                              "8", "--k-fg", "4", "--k-community", "2", "--pca-dim", "4",
                                              "--quiet"], lambda w: w.imgs),
    Command("densevit-analyze", lambda w, o: [str(w.imgs), "-o", str(o), *w.model(), "--load-size", LOAD, "--stride",
                                              "8", "--layers", "11", "--analyses", "attention", "--no-progress"], lambda w: w.imgs),
]


def build_world(root: Path, shared: Path, weights: Path) -> World:
    """The inputs of :data:`COMMANDS` under ``root`` (a store and an index built with the commands themselves)."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    for name, src in (("a.jpg", "cat.jpg"), ("b.jpg", "ibex.jpg")):
        im = Image.open(shared / "data" / "images" / src).convert("RGB")
        im.resize((im.width // 10, im.height // 10), Image.BILINEAR).save(imgs / name, quality=90)
    frames = root / "frames"
    frames.mkdir()
    davis = shared / "data" / "davis2016"
    seq = sorted((davis / "JPEGImages" / "480p").iterdir())[0]
    for i, f in enumerate(sorted(seq.iterdir())[:3]):
        im = Image.open(f).convert("RGB")
        im.resize((im.width // 8, im.height // 8), Image.BILINEAR).save(frames / f"{i:05d}.jpg", quality=90)
    first = np.asarray(Image.open(sorted((davis / "Annotations" / "480p" / seq.name).iterdir())[0]))
    m = Image.fromarray(((first > 0) * 255).astype(np.uint8)).resize((first.shape[1] // 8, first.shape[0] // 8),
                                                                       Image.NEAREST)
    m.save(root / "mask.png")
    w = World(root, weights, imgs, frames, root / "mask.png", root / "store", root / "index")
    assert console_entry("densevit-extract")([str(imgs), "--store", str(w.store), *w.model(), "--load-size", LOAD,
                                              "--stride", "8", "--quiet", "--workers", "0", "--saliency"]) == 0
    assert console_entry("densevit-index")(["build", str(w.store), "-o", str(w.index), "--quiet"]) == 0
    return w


@pytest.fixture(scope="session")
def world(tmp_path_factory, shared, golden_path) -> World:
    """The session's :class:`World` (import this fixture into a test module: ``from fault_commands import
    world``); tests must not change it (the harness checks they do not)."""
    return build_world(tmp_path_factory.mktemp("world"), shared, golden_path)


def run(cmd: Command, world: World, out: Path, capsys) -> "Result":
    """Run ``cmd`` in this process (its console entry with an argument list: it returns the exit code)."""
    capsys.readouterr()
    code = cmd.entry(cmd.argv(world, out))
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_lines(self) -> List[str]:
        """The lines of stderr that report an error (progress bars and notes are not errors)."""
        return [l for l in self.err.splitlines() if ": error:" in l or l.lower().startswith("error")]

    def assert_one_line_error(self, *words: str) -> str:
        assert self.code != 0, (self.code, self.err)
        assert "Traceback" not in self.err and "Traceback" not in self.out, self.err
        lines = self.error_lines()
        assert len(lines) == 1, self.err
        for w in words:
            assert w in lines[0], (w, lines[0])
        return lines[0]


def tree_digest(paths: List[Path]) -> Dict[str, str]:
    """SHA-256 of every file (and the target of every link) under ``paths``: what "no input touched" compares."""
    out: Dict[str, str] = {}
    for top in paths:
        for p in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def partial_files(root: Path) -> List[str]:
    """Files under ``root`` that are not complete: empty, temp files of the atomic writer, or a PNG/GIF/JSON/NPZ
    that does not decode. A complete file written before the fault is allowed."""
    bad: List[str] = []
    if not root.exists() or root.is_symlink():
        return bad
    for p in ([root] if root.is_file() else sorted(root.rglob("*"))):
        if not p.is_file() or p.name == "store.lock":
            continue
        if p.stat().st_size == 0 or ".tmp" in p.name:
            bad.append(f"{p} ({p.stat().st_size} bytes)")
            continue
        try:
            if p.suffix in (".png", ".gif", ".jpg"):
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix in (".npz", ".npy"):
                np.load(p)
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{p} ({type(exc).__name__})")
    return bad


def empty(path: Path) -> None:
    """Remove ``path`` (a file, a link or a folder)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def command(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def ids(commands: Optional[List[Command]] = None) -> List[str]:
    return [c.id for c in (commands or COMMANDS)]
