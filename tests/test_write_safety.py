"""Nothing lost, nothing written into inputs (issue 31, items 1-4, 9, 12, 14, 19): --stats is an output like
any other; a store's prune and overwrite remove only what the store wrote; a lost manifest does not drop the
stored images; the explorer never saves into its inputs; every output place is checked before the model loads;
a query path does not make the current folder a dataset; a second writer is refused before the model loads; a
write cut short (the process killed, or the file-size limit hit) never leaves a partial file under its name."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fault_commands as fc
from fault_commands import world  # noqa: F401 (the session's inputs)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a model is built (the checks under test come before it)."""
    import densevit.features.extractor as fx

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(fx.ViTExtractor, "__init__", refuse)


def _store(world, where: Path, *extra) -> Path:
    cmd = fc.command("densevit-extract:store")
    assert cmd.entry(cmd.argv(world, where) + list(extra)) == 0
    return where


def _extract(world, *argv) -> int:
    w = world
    return fc.console_entry("densevit-extract")([*map(str, argv), "--weights", str(w.weights), "--device", "cpu",
                                                 "--load-size", fc.LOAD, "--stride", "8", "--quiet", "--workers", "0"])


# ------------------------------------------------------------------------------------------- 1, 12: --stats
def test_stats_never_replaces_an_input_or_the_store_manifest(world, tmp_path, capsys, no_model):
    store = tmp_path / "st"
    before = fc.tree_digest(world.inputs)
    assert _extract(world, world.imgs, "--store", store, "--stats", world.imgs / "a.jpg") == 2
    assert "writes into its inputs" in capsys.readouterr().err
    assert _extract(world, world.imgs, "--store", world.store, "--stats", world.store / "manifest.json") == 2
    assert "inside the input folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert _extract(world, world.imgs, "--store", store, "--stats", tmp_path / "afile" / "x.json") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert fc.tree_digest(world.inputs) == before and not store.exists()


def test_stats_written_atomically(world, tmp_path, capsys):
    stats = tmp_path / "s" / "stats.json"
    assert _extract(world, world.imgs, "--store", tmp_path / "st", "--stats", stats) == 0
    assert json.loads(stats.read_text())["images"] == 2
    assert sorted(p.name for p in stats.parent.iterdir()) == ["stats.json"]


# ------------------------------------------------------------------------------------------- 2: prune / overwrite
FOREIGN = ["annotations.json", "model.safetensors", ".hidden", ".notes.tmp", "x.y.json"]


@pytest.mark.parametrize("how", ["--prune", "--overwrite"])
def test_prune_and_overwrite_remove_only_what_the_store_wrote(how, world, tmp_path, capsys):
    store = _store(world, tmp_path / "st")
    for name in FOREIGN:                               # someone else's files, among the shards
        (store / "shards" / name).write_text(json.dumps({"mine": name}))
    (store / ".user.tmp").write_text("keep")
    own = sorted(p.name for p in (store / "shards").iterdir() if p.name not in FOREIGN)
    assert _extract(world, world.imgs / "a.jpg", "--store", store, how) == 0
    left = {p.name for p in (store / "shards").iterdir()}
    assert set(FOREIGN) <= left, left                    # nothing foreign removed
    assert (store / ".user.tmp").read_text() == "keep"
    assert {n for n in own if n not in left}, "the store's own pruned shard is gone"
    from densevit.storage.store import FeatureStore

    assert FeatureStore(store).images == ["a.jpg"]


def test_a_store_with_linked_shards_writes_and_prunes_nothing_there(world, tmp_path, capsys, no_model):
    """The issue's reproduction: ln -s ../imgs st/shards; extract --overwrite, then --prune."""
    imgs = tmp_path / "imgs"
    shutil.copytree(world.imgs, imgs)
    for name in ("annotations.json", "model.safetensors", ".hidden"):
        (imgs / name).write_text("user data")
    before = fc.tree_digest([imgs])
    store = tmp_path / "st"
    store.mkdir()
    (store / "shards").symlink_to(Path("..") / "imgs")
    for extra in (["--overwrite"], ["--prune"]):
        assert _extract(world, imgs / "a.jpg", "--store", store, *extra) == 2
        err = capsys.readouterr().err
        assert "symbolic link" in err and err.count("\n") == 1, err
    assert fc.tree_digest([imgs]) == before


# ------------------------------------------------------------------------------------------- 4: lost manifest
def test_a_lost_manifest_keeps_the_stored_images(world, tmp_path, capsys):
    from densevit.storage.store import FeatureStore

    store = _store(world, tmp_path / "st")
    (store / "manifest.json").unlink()
    capsys.readouterr()
    assert _extract(world, world.imgs / "a.jpg", "--store", store) == 0
    out = capsys.readouterr().out
    assert "2 kept" in out, out
    assert sorted(FeatureStore(store).images) == ["a.jpg", "b.jpg"]
    assert _extract(world, world.imgs, "--store", store) == 0          # the full run: no orphan shard
    st = FeatureStore(store)
    names = {p.name.split(".")[0] for p in (store / "shards").iterdir()}
    assert names == set(st.manifest["shards"]), (names, st.manifest["shards"])


# ------------------------------------------------------------------------------------------- 3, 12: the explorer
def test_explorer_refuses_to_save_into_its_inputs_before_loading(world, tmp_path, capsys, monkeypatch):
    import importlib

    import uvicorn

    def refuse(*a, **k):
        raise AssertionError("the explorer's model was built (or its server started) before the checks")

    explore = fc.console_entry("densevit-explore")
    script = fc.console_script("densevit-explore")              # the modules the command really runs
    session = importlib.import_module(script.module.rsplit(".cli.", 1)[0] + ".explore.session")
    monkeypatch.setattr(session.Explorer, "__init__", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)
    before = fc.tree_digest(world.inputs)
    assert explore([str(world.imgs), "-o", str(world.imgs), "--weights", str(world.weights)]) == 2
    assert "input folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert explore([str(world.imgs), "-o", str(tmp_path / "afile" / "x"), "--weights", str(world.weights)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert explore([str(world.imgs), "-o", str(tmp_path / "o"), "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "Traceback" not in err
    assert fc.tree_digest(world.inputs) == before


# ------------------------------------------------------------------------------------------- 14: index search
def test_index_search_with_a_query_path_relative_to_the_current_folder(world, tmp_path, monkeypatch, capsys):
    """The README's example: --image DATASET/x.jpg --out out/search, run from the folder holding DATASET."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(world.imgs, work / "DATASET")
    monkeypatch.chdir(work)
    assert _extract(world, "DATASET", "--store", "st") == 0
    index = fc.console_entry("densevit-index")
    assert index(["build", "st", "-o", "ix", "--quiet"]) == 0
    assert index(["search", "ix", "--image", "DATASET/a.jpg", "--point", "10,10", "-k", "2", "--out",
                  "out/search"]) == 0, capsys.readouterr().err
    assert (work / "out" / "search" / "a_matches.json").is_file()
    assert index(["search", "ix", "--image", "DATASET/a.jpg", "--point", "10,10", "-k", "2", "--out",
                  "DATASET/search"]) == 2                               # the dataset itself is still refused
    assert "input folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 19: the lock first
def test_a_locked_store_is_refused_before_the_model_loads(world, tmp_path, capsys, no_model):
    from densevit.storage.store import StoreLock

    store = tmp_path / "st"
    store.mkdir()
    with StoreLock(store):
        assert _extract(world, world.imgs, "--store", store) == 2
    err = capsys.readouterr().err
    assert "being written by another process" in err and f"PID {os.getpid()}" in err


# ------------------------------------------------------------------------------------------- 9: cut short
def _limited(argv, limit: int, kill: bool) -> subprocess.CompletedProcess:
    """Run a command with a file-size limit of ``limit`` bytes: a larger write kills it (SIGXFSZ), or with
    ``kill=False`` fails with EFBIG (the write fails half way)."""

    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    # Python ignores SIGXFSZ (writes then fail with EFBIG); its default action kills the process
    code = ("import signal, sys; " + ("signal.signal(signal.SIGXFSZ, signal.SIG_DFL); " if kill else "")
            + f"from fault_commands import console_entry; sys.exit(console_entry({argv[0]!r})({argv[1:]!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, preexec_fn=pre,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "write-fails"])
def test_a_write_cut_short_leaves_no_partial_file(kill, world, tmp_path):
    """densevit-discover writes a small mask PNG, then an overlay of the photograph (over 16 KiB): a 16 KiB
    file-size limit cuts the overlay short (the process killed by SIGXFSZ, or the write failing with EFBIG)."""
    out = tmp_path / "out"
    argv = ["densevit-discover", *map(str, [world.imgs / "a.jpg", "--out", out, "--weights", world.weights,
                                            "--device", "cpu", "--load-size", fc.LOAD, "--stride", 8, "--quiet",
                                            "--backbone", "dino_vits8"])]
    r = _limited(argv, 16 << 10, kill)
    if kill:
        assert r.returncode == -signal.SIGXFSZ, (r.returncode, r.stderr)
    else:
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        lines = [l for l in r.stderr.splitlines() if "error" in l]
        assert len(lines) == 1 and "a_overlay.png" in lines[0], r.stderr
        assert not list(out.rglob(".*"))                                   # the temp file was removed too
    named = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert [p.name for p in named] == ["a_mask.png"], named               # complete files only, nothing half
    assert fc.partial_files(out) == [] or kill and all(".tmp" in f for f in fc.partial_files(out))
    r = subprocess.run([sys.executable, "-c", f"import sys; from fault_commands import console_entry; "
                        f"sys.exit(console_entry({argv[0]!r})({argv[1:] + ['--overwrite']!r}))"],
                       cwd=Path(__file__).parent, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("a_overlay.png", "a_mask.png"):
        with Image.open(out / name) as im:
            im.load()
    assert json.loads((out / "boxes.json").read_text())["images"]["a"]["box_xyxy"]


def test_save_png_into_a_too_small_disk(tmp_path):
    """apps.draw's PNG writers go through the atomic writer: a full device is one OutputWriteError naming the
    file and the space it needs, and no file is left (PIL's own save left a truncated PNG)."""
    from densevit.apps import draw
    from densevit.io.files import OutputWriteError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"needs a tmpfs (run as root): {r.stderr.decode().strip()}")
    try:
        noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
        with pytest.raises(OutputWriteError, match=r"cannot write .*noise\.png: no space left .*needs more than"):
            draw.save_rgb(mnt / "noise.png", noise)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
