"""The fault harness (issue 31): every command (tests/fault_commands.py: extract to files and to a store, its
--stats, coseg, partseg, match, pca, discover, vos and its --gif and --video, index build and search, analyze, and the
explorer's Save) run against a full disk (a small tmpfs, filled), a read-only output location (a tmpfs mounted
read-only: root ignores file modes), an output that is a symbolic link into its inputs, and a store whose
internals are links. Each ends in one error line, a non-zero exit, no traceback, no input touched and no
partial file. Mounting needs root (CI and this machine run as root): where it is refused the test fails."""
from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import fault_commands as fc
from fault_commands import world  # noqa: F401 (the session's inputs)

pytestmark = pytest.mark.usefixtures("one_thread")


class Mounts:
    """tmpfs mounts made by a test, unmounted at its end."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, []

    def tmpfs(self, name: str, size: str = "1m", readonly: bool = False) -> Path:
        mnt = self.root / name
        mnt.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.fail(f"the fault harness mounts a tmpfs (run as root): {r.stderr.decode().strip()}")
        self.made.append(mnt)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        return mnt

    def full(self, name: str) -> Path:
        """A tmpfs with no byte free (a filler file takes all its space)."""
        mnt = self.tmpfs(name)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        return mnt

    def close(self) -> None:
        for mnt in reversed(self.made):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture()
def mounts(tmp_path):
    m = Mounts(tmp_path / "mnt")
    yield m
    m.close()


def _out(cmd: fc.Command, where: Path) -> Path:
    suffix = {"gif": ".gif", "video": ".avi"}.get(cmd.name.rsplit(":", 1)[-1], ".json")
    return where / f"x{suffix}" if cmd.out_is_file else where / "out"


def _faulty(cmd: fc.Command, world: fc.World, out: Path, capsys, *words: str):
    """Run ``cmd``; assert one error line holding ``words``, a non-zero exit, no traceback, no input changed."""
    before = fc.tree_digest(world.inputs)
    res = fc.run(cmd, world, out, capsys)
    line = res.assert_one_line_error(*words)
    assert fc.tree_digest(world.inputs) == before, f"{cmd.name} changed its inputs"
    return line


@pytest.mark.parametrize("cmd", fc.COMMANDS, ids=fc.ids())
def test_full_disk_one_line_and_no_partial_file(cmd, world, mounts, capsys):
    mnt = mounts.full("full")
    out = _out(cmd, mnt)
    line = _faulty(cmd, world, out, capsys, "no space left")
    assert str(mnt) in line, line                                    # names the place
    assert fc.partial_files(mnt) == [], fc.partial_files(mnt)         # no 0-byte, truncated or temp file


@pytest.mark.parametrize("cmd", fc.COMMANDS, ids=fc.ids())
def test_read_only_output_refused_before_any_work(cmd, world, mounts, capsys, monkeypatch):
    mnt = mounts.tmpfs("ro", readonly=True)
    import densevit.features.extractor as fx

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(fx.ViTExtractor, "__init__", no_model)
    _faulty(cmd, world, _out(cmd, mnt), capsys, "read-only")
    assert not list(mnt.iterdir())


@pytest.mark.parametrize("cmd", fc.COMMANDS, ids=fc.ids())
def test_symlinked_output_into_the_inputs_refused(cmd, world, tmp_path, capsys):
    link = _out(cmd, tmp_path / "links")
    link.parent.mkdir(parents=True)
    link.symlink_to(cmd.target(world).resolve())
    _faulty(cmd, world, link, capsys, "input")


@pytest.mark.parametrize("internal", ["shards", "manifest.json", "store.json"])
def test_symlinked_store_internals_refused(internal, world, tmp_path, capsys):
    """A store whose shards/ (or manifest, settings) is a link would write, and prune, elsewhere."""
    store = tmp_path / "st"
    store.mkdir()
    target = world.imgs if internal == "shards" else world.imgs / "a.jpg"
    (store / internal).symlink_to(target.resolve())
    cmd = fc.command("densevit-extract:store")
    for extra in ([], ["--overwrite"], ["--prune"]):
        before = fc.tree_digest(world.inputs)
        capsys.readouterr()
        code = cmd.entry(cmd.argv(world, store) + extra)
        cap = capsys.readouterr()
        fc.Result(code, cap.out, cap.err).assert_one_line_error("symbolic link")
        assert fc.tree_digest(world.inputs) == before


# ---------------------------------------------------------------------------------------------- the explorer
@pytest.fixture(scope="module")
def explorer(world, make_extractor, golden_path):
    from densevit.apps.explore.session import Explorer

    ex = Explorer(extractor=make_extractor(8), weights=str(golden_path), load_size=32)
    for p in sorted(world.imgs.iterdir()):
        ex.add_image(p)
    return ex


def _save(explorer, world, out: Path):
    from densevit.apps.explore.web import create_app
    from starlette.testclient import TestClient

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    home = "http://127.0.0.1:7860"
    with TestClient(create_app(explorer, out, inputs=[world.imgs]), base_url=home, headers={"Origin": home},
                    raise_server_exceptions=False) as c:
        return c.post("/api/save", json={"png": url, "mode": "pca", "settings": {"stride": 8, "load_size": 32}})


@pytest.mark.parametrize("fault", ["full", "readonly", "symlink"])
def test_explorer_save_faults(fault, explorer, world, mounts, tmp_path):
    before = fc.tree_digest(world.inputs)
    if fault == "symlink":
        out = tmp_path / "saves"
        out.symlink_to(world.imgs.resolve())
        where = world.imgs
    else:
        where = mounts.full("full") if fault == "full" else mounts.tmpfs("ro", readonly=True)
        out = where / "saves"
    r = _save(explorer, world, out)
    assert r.status_code in {"full": (507,), "readonly": (500,), "symlink": (400,)}[fault], (r.status_code, r.text)
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert {"full": "no space left", "readonly": "read-only", "symlink": "input"}[fault] in msg
    assert fc.tree_digest(world.inputs) == before
    assert not [p for p in where.rglob("explore_*")] and not [p for p in where.rglob(".*tmp*")]
    assert _save(explorer, world, tmp_path / "fine").status_code == 200     # a good place still saves


def test_the_table_holds_every_command():
    """Every console script of densevit is in the harness (the explorer through its app above)."""
    from importlib.metadata import entry_points

    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.name.startswith("densevit-")}
    assert scripts - {c.name.split(":")[0] for c in fc.COMMANDS} <= {"densevit-explore"}, scripts
