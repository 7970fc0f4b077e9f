"""The feature store under faults (issue 21): another image list adds to a store and never wipes it (only
--prune / --overwrite remove, in one line); one writer at a time (a second is refused naming the holder's PID,
the lock of a killed process does not block, torchrun ranks are one writer); a full disk (a small tmpfs) ends
in one line naming the folder and the space needed, leaves every finished shard valid and no temp file, and the
rerun after freeing space gives the same store; files follow the umask."""
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from densevit.storage.store import FeatureStore, StoreError, StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDE, LOAD = 8, 64


@pytest.fixture(scope="module")
def lists(tmp_path_factory, shared):
    """Two folders of small images: ``a`` (three) and ``b`` (two, other names)."""
    root = tmp_path_factory.mktemp("lists")
    cat, ibex = (Image.open(shared / "data" / "images" / n) for n in ("cat.jpg", "ibex.jpg"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(2):
        cat.reduce(20 + 4 * i).save(root / "a" / f"cat{i}.jpg")
    ibex.reduce(20).crop((0, 0, 120, 96)).save(root / "a" / "ibex0.png")
    cat.reduce(28).save(root / "b" / "cat2.jpg")
    ibex.reduce(24).crop((0, 0, 120, 96)).save(root / "b" / "ibex1.png")
    return root


def _cli(*argv):
    from densevit.cli.extract import entry

    return entry([str(a) for a in argv])


def _flags(golden_path, *extra):
    return ["--weights", golden_path, "--stride", STRIDE, "--load-size", LOAD, "--quiet", "--layer", 9,
            "--workers", 0, *extra]


def _files(store: Path) -> dict:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def _subprocess_cli(args):
    cmd = [sys.executable, "-m", "densevit.cli.extract", *map(str, args)]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------- 1. a store grows
def test_another_list_adds_its_images_and_keeps_the_stored_ones(lists, tmp_path, golden_path, capsys):
    st = tmp_path / "st"
    assert _cli(lists / "a", "--store", st, *_flags(golden_path)) == 0
    kept = {p: p.read_bytes() for p in (st / "shards").glob("*.safetensors")}
    capsys.readouterr()
    assert _cli(lists / "b", "--store", st, *_flags(golden_path)) == 0
    out = capsys.readouterr().out
    assert f"store {st}: 3 kept, 2 added\n" in out
    assert sorted(FeatureStore(st).images) == ["cat0.jpg", "cat1.jpg", "cat2.jpg", "ibex0.png", "ibex1.png"]
    assert all(p.read_bytes() == data for p, data in kept.items())        # the stored shards untouched
    FeatureStore(st).verify_all()

    # a stored shard truncated: a run with the other list recomputes it, from its images' files, identically
    victim = next(iter(kept))
    victim.write_bytes(kept[victim][:500])
    assert _cli(lists / "b", "--store", st, *_flags(golden_path)) == 0
    assert f"store {st}: 5 kept, 0 added\n" in capsys.readouterr().out
    assert victim.read_bytes() == kept[victim]

    # an input with a stored key but another file: refused in one line (nothing replaced) unless --prune
    other = tmp_path / "other"
    other.mkdir()
    Image.open(lists / "b" / "cat2.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other / "cat0.jpg")
    before = _files(st)
    assert _cli(other, "--store", st, *_flags(golden_path)) == 2
    err = capsys.readouterr().err
    assert "key of a stored image from another file (cat0.jpg" in err and "--prune" in err
    assert len(err.strip().splitlines()) == 1 and _files(st) == before

    # --prune: the store holds exactly the list; one line names what it removed, and their shards are gone
    assert _cli(lists / "b", "--store", st, *_flags(golden_path, "--prune")) == 0
    assert (f"store {st}: 2 kept, 0 added, 3 removed by --prune (cat0.jpg, cat1.jpg, ibex0.png)\n"
            in capsys.readouterr().out)
    assert sorted(FeatureStore(st).images) == ["cat2.jpg", "ibex1.png"]
    assert not any(p.exists() for p in kept)
    assert len(list((st / "shards").glob("*.safetensors"))) == len(FeatureStore(st).manifest["shards"])

    # --overwrite empties the store first, and says so
    assert _cli(lists / "a" / "cat0.jpg", "--store", st, *_flags(golden_path, "--overwrite")) == 0
    assert (f"store {st}: 0 kept, 1 added, 2 removed by --overwrite (cat2.jpg, ibex1.png)\n"
            in capsys.readouterr().out)
    assert FeatureStore(st).images == ["cat0.jpg"]


def test_a_changed_file_is_re_extracted(lists, tmp_path, golden_path, capsys):
    im = tmp_path / "in" / "pic.jpg"
    im.parent.mkdir()
    Image.open(lists / "a" / "cat0.jpg").save(im)
    st = tmp_path / "st"
    assert _cli(im.parent, lists / "b", "--store", st, *_flags(golden_path)) == 0
    Image.open(lists / "a" / "cat1.jpg").save(im)                         # another picture, another size
    capsys.readouterr()
    assert _cli(im.parent, "--store", st, *_flags(golden_path)) == 0
    assert f"store {st}: 2 kept, 0 added, 1 re-extracted (file changed)\n" in capsys.readouterr().out
    s = FeatureStore(st)
    assert sorted(s.images) == ["cat2.jpg", "ibex1.png", "pic.jpg"]
    assert s.grid("pic.jpg").original_hw == Image.open(im).size[::-1]
    assert len(s.manifest["shards"]) == len(list((st / "shards").glob("*.safetensors")))  # the old one removed


# ------------------------------------------------------------------------------------------- 2. one writer
def test_two_writers_at_once_lose_nothing(lists, tmp_path, golden_path):
    """Two runs with different lists started together: each one either completes or is refused in one line
    (the store's lock); the store holds the images of every run that completed, and the refused one's rerun
    completes it."""
    st = tmp_path / "st"
    runs = {name: _subprocess_cli([lists / name, "--store", st, *_flags(golden_path)]) for name in ("a", "b")}
    done = {name: (p.wait(timeout=240), *p.communicate()) for name, p in runs.items()}
    assert any(code == 0 for code, _, _ in done.values()), done
    for name, (code, out, err) in done.items():
        if code != 0:
            assert code == 2 and "is being written by another process (PID " in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = {n: sorted(p.name for p in (lists / n).iterdir()) for n in ("a", "b")}
    stored = set(FeatureStore(st).images)
    for name, (code, _, _) in done.items():
        if code == 0:
            assert set(expected[name]) <= stored, (name, stored)
    for name, (code, _, _) in done.items():
        if code != 0:
            assert _cli(lists / name, "--store", st, *_flags(golden_path)) == 0
    assert sorted(FeatureStore(st).images) == sorted(expected["a"] + expected["b"])


def test_a_held_lock_refuses_naming_the_pid_and_a_killed_holder_does_not_block(lists, tmp_path, golden_path,
                                                                               capsys):
    st = tmp_path / "st"
    assert _cli(lists / "a", "--store", st, *_flags(golden_path)) == 0
    before = _files(st)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from densevit.storage.store import StoreLock; "
                               "StoreLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(st)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _cli(lists / "b", "--store", st, *_flags(golden_path)) == 2
        err = capsys.readouterr().err
        assert f"is being written by another process (PID {holder.pid} on " in err
        assert len(err.strip().splitlines()) == 1
        assert {k: v for k, v in _files(st).items() if k != "store.lock"} == \
            {k: v for k, v in before.items() if k != "store.lock"}          # nothing written
        with pytest.raises(StoreError, match=f"PID {holder.pid}"):           # the library refuses as well
            StoreWriter(st, FeatureStore(st).settings).prepare()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died with the lock held (its PID is still in the file): the kernel released it
    assert f"PID {holder.pid}" in (st / "store.lock").read_text()
    assert _cli(lists / "b", "--store", st, *_flags(golden_path)) == 0
    assert len(FeatureStore(st)) == 5 and (st / "store.lock").read_text() == ""


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A writer's decoding workers are forked children: when the writer ends (or is killed), a worker still
    exiting must not hold the store's lock."""
    import multiprocessing

    from densevit.storage.store import StoreLock

    mp = multiprocessing.get_context("fork")
    running = mp.Event()

    def work():
        running.set()
        signal.pause()

    lock = StoreLock(tmp_path).acquire()
    child = mp.Process(target=work)
    child.start()
    try:
        assert running.wait(60)
        lock.release()
        StoreLock(tmp_path).acquire().release()       # another descriptor: refused if the child held the lock
    finally:
        child.kill()
        child.join()


def test_torchrun_job_on_a_locked_store_stops_every_rank(lists, tmp_path, golden_path):
    """A job on a store another process holds stops, on every rank, with the one-line refusal (rank 0 takes the
    lock for the job and tells the others; the torchrun tests of test_store.py show that a job's own ranks do
    not block each other)."""
    from densevit.storage.store import StoreLock

    st = tmp_path / "st"
    st.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "densevit.cli.extract", lists / "a", "--store", st, *_flags(golden_path)]
    with StoreLock(st):
        r = subprocess.run([*map(str, cmd)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=240)
    assert r.returncode != 0
    assert r.stderr.count(f"is being written by another process (PID {os.getpid()} on ") == 2, r.stderr
    assert sorted(os.listdir(st)) == ["store.lock"]


# ------------------------------------------------------------------------------------------- 8. a full disk
@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of 4 KiB (resized with ``resize(bytes)``); skipped only where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_full_disk_one_line_shards_valid_and_the_rerun_completes(lists, tmp_path, golden_path, small_disk, capsys):
    args = [lists / "a", lists / "b", *_flags(golden_path, "--layer", 11, "--facet", "key", "token",
                                             "--store-dtype", "float32", "--shard-size", 1, "--writers", 1)]
    ref = tmp_path / "ref"
    assert _cli(*args, "--store", ref) == 0
    reference = _files(ref)
    shard_bytes = sorted(p.stat().st_size for p in (ref / "shards").glob("*.safetensors"))
    mnt, resize = small_disk
    resize(shard_bytes[0] + shard_bytes[1] + 64 * 1024)                    # room for two of the five shards
    st = mnt / "store"
    capsys.readouterr()
    assert _cli(*args, "--store", st) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Errno" not in err
    assert f"no space left on the device of {st / 'shards'} (" in err and "more needed to finish the store" in err
    need, unit = err.split("about ")[1].split(" more needed")[0].split()
    need = float(need) * {"KiB": 2 ** 10, "MiB": 2 ** 20}[unit]
    written = {p.name for p in (st / "shards").glob("*.safetensors")}
    missing = sum(p.stat().st_size for p in (ref / "shards").glob("*.safetensors") if p.name not in written)
    assert 0 < len(written) < 5 and missing <= need <= 1.5 * missing       # the estimate: the unwritten shards
    assert not [p for p in st.rglob("*") if p.name.endswith(".tmp")]     # no temp file left
    for p in (st / "shards").glob("*.safetensors"):                     # every finished shard is whole
        name = str(p.relative_to(st))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == reference[name]
    resize(64 * 2 ** 20)                                                  # space freed: the rerun completes
    assert _cli(*args, "--store", st) == 0
    assert _files(st) == reference


# ------------------------------------------------------------------------------------------- 12. the umask
def test_store_index_and_cache_files_follow_the_umask(tmp_path):
    import torch

    from densevit.storage import patch_index as pi
    from densevit.storage.cache import DescriptorCache

    old = os.umask(0o027)
    try:
        settings = {"format": "densevit-store-v1", "backbone": "planted", "weights": {"source": "random"},
                    "patch_size": 8, "stride": 8, "load_size": None, "depth": 1, "layers": [0], "facets": ["key"],
                    "model_dtype": "float32", "store_dtype": "float32", "saliency": False, "fast_decode": False,
                    "mean": [0, 0, 0], "std": [1, 1, 1]}
        w = StoreWriter(tmp_path / "st", settings)
        w.prepare()
        images = [{"key": f"im{i}.png", "source": {"path": f"/x/im{i}.png"}, "image_hw": [16, 16]} for i in range(3)]
        w.write_shard("16x16-00000", {"0/key": torch.randn(3, 4, 8)}, images, (16, 16), {})
        w.finalize([("16x16-00000", images)], {})
        pi.build_index(FeatureStore(tmp_path / "st"), tmp_path / "idx", pi.IndexConfig(kind="flat"), progress=False)
        DescriptorCache(tmp_path / "cache").save({"k": 1}, {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    files = [p for d in ("st", "idx", "cache") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert len(files) >= 8
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == \
        {str(p.relative_to(tmp_path)): oct(0o640) for p in files}


def test_a_store_another_writer_is_making_is_refused_as_busy(tmp_path):
    """The second of two writers started together finds the folder with the first one's lock and shard folder but
    no settings yet: it is told the store is being written (it was told the folder is not a store)."""
    from densevit.storage.store import StoreError, StoreLock, StoreWriter

    root = tmp_path / "st"
    root.mkdir()
    first = StoreLock(root).acquire()               # the first writer, between its lock and its settings
    (root / "shards").mkdir()
    try:
        with pytest.raises(StoreError, match="is being written by another process"):
            StoreWriter(root, {"backbone": "dino_vits8"}).prepare()
    finally:
        first.release()
    with pytest.raises(StoreError, match="is not a densevit store"):     # its writer died: not a store
        StoreWriter(root, {"backbone": "dino_vits8"}).prepare()
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "x.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="is not a densevit store"):
        StoreWriter(plain, {"backbone": "dino_vits8"}).prepare()
    assert sorted(p.name for p in plain.iterdir()) == ["x.jpg"]           # nothing written into it
