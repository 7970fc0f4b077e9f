"""Feature store and dataset extraction: round trip, read-time binning, corruption, settings, bad input, torchrun."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from densevit.storage.store import FeatureStore, StoreError

STRIDE, LOAD = 8, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared):
    """Five small images of two resized shapes and one corrupt file."""
    d = tmp_path_factory.mktemp("dataset") / "images"
    d.mkdir()
    cat, ibex = (Image.open(shared / "data" / "images" / n) for n in ("cat.jpg", "ibex.jpg"))
    for i in range(3):
        cat.reduce(20 + 4 * i).save(d / f"cat{i}.jpg")
    for i in range(2):
        ibex.reduce(20 + 4 * i).crop((0, 0, 120, 96)).save(d / f"ibex{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _cli(*argv):
    from densevit.cli.extract import entry

    return entry([str(a) for a in argv])


def _common(golden_path):
    return ["--weights", golden_path, "--stride", STRIDE, "--load-size", LOAD, "--quiet"]


def _contents(store: Path) -> dict:
    """SHA-256 of every file of a store (the manifest and all shards with their records)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store32(folder, tmp_path_factory, golden_path, one_thread):
    """One process, float32, batch size 1 (bit-comparable with single-image extraction)."""
    out = tmp_path_factory.mktemp("s32") / "store"
    code = _cli(folder, "--store", out, *_common(golden_path), "--layer", 9, 11, "--facet", "key", "token",
                "--saliency", "--store-dtype", "float32", "--batch-size", 1, "--workers", 0, "--shard-size", 2)
    assert code == 1  # the broken file
    return out


def test_round_trip_and_read_time_binning(store32, folder, make_extractor):
    st = FeatureStore(store32)
    assert sorted(st.images) == ["cat0.jpg", "cat1.jpg", "cat2.jpg", "ibex0.png", "ibex1.png"]
    assert "broken.jpg" in st.failed and "broken.jpg" not in st
    assert st.layers == [9, 11] and st.facets == ["key", "token"]
    ext = make_extractor(STRIDE)
    for key in ("cat1.jpg", "ibex0.png"):
        x, grid = ext.preprocess(folder / key, LOAD)
        raw = ext.extract(x, (9, 11), ("key", "token"), saliency=True, image_hw=grid.image_hw)
        binned = ext.extract(x, (9,), ("key",), bin=True)
        assert st.grid(key) == grid
        assert st.grid(folder / key) == grid  # by path too
        for l in (9, 11):
            for f in ("key", "token"):
                assert torch.equal(st.descriptors(key, l, f), raw.descriptors[(l, f)][0])
                assert torch.equal(st.cls(key, l, f), raw.cls[(l, f)][0])
        assert torch.equal(st.saliency(key), raw.saliency[0])
        # binning at read time == binning at extraction
        assert torch.equal(st.descriptors(key, 9, "key", bin=True), binned.descriptors[(9, "key")][0])
    seen = []
    for b in st.batches(batch_size=2, layer=9, facet="key", bin=True):
        h, w = b.grids[0].shape
        assert b.descriptors.shape == (len(b.keys), h * w, 17 * 384)
        assert all(g.input_hw == b.grids[0].input_hw for g in b.grids)
        seen += b.keys
    assert sorted(seen) == sorted(st.images)
    with pytest.raises(StoreError, match="layers"):
        st.descriptors("cat0.jpg")  # two layers stored: say which


def test_float16_default_close_to_float32(folder, tmp_path, golden_path, store32, one_thread):
    out = tmp_path / "s16"
    assert _cli(folder / "cat0.jpg", folder / "ibex1.png", "--store", out, *_common(golden_path),
                "--layer", 9, "--workers", 0) == 0
    st16, st32 = FeatureStore(out), FeatureStore(store32)
    for key in ("cat0.jpg", "ibex1.png"):
        a, b = st16.descriptors(key, bin=True), st32.descriptors(key, 9, "key", bin=True)
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU path of the extraction loop)")
def test_cuda_store_matches_cpu_store(folder, tmp_path, golden_path, store32):
    """On a GPU the batch outputs are copied to the host on a side stream while the next batch computes: the
    store holds what the CPU computes (several batches per shard and several shards, so the overlap happens)."""
    out = tmp_path / "cuda"
    assert _cli(folder, "--store", out, *_common(golden_path), "--layer", 9, 11, "--facet", "key", "token",
                "--saliency", "--store-dtype", "float32", "--batch-size", 1, "--workers", 1, "--shard-size", 2,
                "--device", "cuda") == 1  # the broken file
    gpu, cpu = FeatureStore(out), FeatureStore(store32)
    assert sorted(gpu.images) == sorted(cpu.images)
    for key in cpu.images:
        for l in (9, 11):
            for f in ("key", "token"):
                a, b = gpu.descriptors(key, l, f), cpu.descriptors(key, l, f)
                assert a.shape == b.shape
                assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99999
        assert (gpu.saliency(key) - cpu.saliency(key)).abs().max() < 1e-4


def test_corruption_detected_and_named(folder, tmp_path, golden_path, one_thread):
    out = tmp_path / "s"
    assert _cli(folder / "cat0.jpg", folder / "ibex0.png", "--store", out, *_common(golden_path), "--layer", 9,
                "--workers", 0) == 0
    shards = sorted((out / "shards").glob("*.safetensors"))
    assert len(shards) == 2
    # tampered: one byte flipped in the data
    data = bytearray(shards[0].read_bytes())
    data[-5] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    st = FeatureStore(out)
    key = next(k for k in st.images if st.manifest["images"][k]["shard"] == shards[0].stem)
    with pytest.raises(StoreError, match=shards[0].name + ".*SHA-256"):
        st.descriptors(key)
    # truncated
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    other = next(k for k in st.images if k != key)
    with pytest.raises(StoreError, match=shards[1].name + ".*truncated"):
        FeatureStore(out).descriptors(other)
    # rerunning the same command recomputes exactly the two bad shards
    assert _cli(folder / "cat0.jpg", folder / "ibex0.png", "--store", out, *_common(golden_path), "--layer", 9,
                "--workers", 0) == 0
    st = FeatureStore(out)
    st.verify_all()
    assert st.descriptors(key).shape[0] == st.grid(key).num_tokens


def test_other_settings_refused_and_no_overwrite(folder, tmp_path, golden_path, capsys, one_thread):
    out = tmp_path / "s"
    assert _cli(folder / "ibex0.png", "--store", out, *_common(golden_path), "--layer", 9, "--workers", 0) == 0
    before = _contents(out)
    code = _cli(folder / "ibex0.png", "--store", out, *_common(golden_path), "--layer", 11, "--workers", 0)
    err = capsys.readouterr().err
    assert code == 2 and "other settings" in err and "layers" in err and "Traceback" not in err
    assert _contents(out) == before
    # a folder that is not a store is not written into
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert _cli(folder / "ibex0.png", "--store", other, *_common(golden_path), "--workers", 0) == 2
    assert sorted(os.listdir(other)) == ["keep.txt"]
    # --overwrite replaces the store with the new settings
    assert _cli(folder / "ibex0.png", "--store", out, *_common(golden_path), "--layer", 11, "--workers", 0,
                "--overwrite") == 0
    assert FeatureStore(out).layers == [11]


def test_unreadable_images_reported_and_skipped(store32, capsys):
    m = json.loads((store32 / "manifest.json").read_text())
    assert m["complete"] and list(m["failed"]) == ["broken.jpg"] and len(m["images"]) == 5


def test_npz_mode_unchanged_and_needs_one_layer(folder, tmp_path, golden_path, capsys):
    code = _cli(folder / "ibex0.png", "-o", tmp_path, *_common(golden_path), "--layer", 9, 11)
    assert code == 2 and "--store" in capsys.readouterr().err


def _torchrun(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "densevit.cli.extract", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_equal_one_and_resume(folder, tmp_path, golden_path, one_thread):
    args = [folder, *_common(golden_path), "--layer", 9, 11, "--facet", "key", "token", "--saliency",
            "--batch-size", 2, "--shard-size", 2]
    one = tmp_path / "one"
    assert _cli(*args, "--store", one, "--workers", 0) == 1  # single process, one thread, in-process decoding
    two = tmp_path / "two"
    r = _torchrun([*args, "--store", two, "--workers", 1, "--stats", tmp_path / "stats.json"])
    assert "densevit-extract: skipping unreadable image: cannot read image" in r.stderr and "broken.jpg" in r.stderr
    assert "6 image(s)" not in r.stdout and "5 image(s) extracted in 3 shard(s)" in r.stdout, r.stdout + r.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())  # the timing report: both ranks, their windows
    assert stats["world_size"] == 2 and sum(r["images"] for r in stats["per_rank"]) == stats["images"] == 5
    (t0, t1), windows = stats["window"], [r["window"] for r in stats["per_rank"]]
    assert all(t0 <= a <= b <= t1 for a, b in windows) and t1 - t0 <= stats["seconds"]["total"] + 5
    assert _contents(two) == _contents(one)  # identical bytes: manifest, records and shards
    # kill one shard; the rerun recomputes only that one and leaves the others untouched
    shards = sorted((two / "shards").glob("*.safetensors"))
    victim = shards[1]
    stamps = {p: p.stat().st_mtime_ns for p in shards if p != victim}
    victim.unlink()
    with pytest.raises(StoreError, match="missing"):
        FeatureStore(two).descriptors(next(k for k, e in FeatureStore(two, verify=False).manifest["images"].items()
                                           if e["shard"] == victim.stem), 9, "key")
    r = _torchrun([*args, "--store", two, "--workers", 1])
    assert "1 image(s) extracted in 1 shard(s), 2 shard(s) already complete" in r.stdout or \
        "2 image(s) extracted in 1 shard(s), 2 shard(s) already complete" in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert _contents(two) == _contents(one)


def test_killed_run_leaves_valid_shards_and_the_rerun_finishes(folder, tmp_path, golden_path, one_thread):
    """SIGKILL one rank once a shard is written (torchrun then stops the other): the shards on disk are whole,
    and rerunning the same command keeps them, computes the rest and gives the one-process store."""
    import signal
    import time

    args = [folder, "--weights", golden_path, "--stride", 4, "--load-size", 2 * LOAD, "--quiet", "--layer", 11,
            "--facet", "key", "--batch-size", 1, "--shard-size", 1]     # slow enough per image to kill mid-run
    one = tmp_path / "one"
    assert _cli(*args, "--store", one, "--workers", 0) == 1
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "densevit.cli.extract", *map(str, [*args, "--store", two, "--workers", 0])]
    job = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((two / "shards").glob("*.json")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = [int(c) for c in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()] \
        if job.poll() is None else []
    assert ranks, "the run ended before a rank could be killed: nothing was tested"
    os.kill(ranks[0], signal.SIGKILL)                # one rank dies; torchrun then stops the other one
    job.wait(timeout=120)
    assert job.returncode != 0                       # torchrun reports the killed rank
    kept = {p: p.stat().st_mtime_ns for p in (two / "shards").glob("*.safetensors")}
    assert kept and len(kept) < 5 and not (two / "manifest.json").is_file()   # killed mid-run: a partial store
    reference = _contents(one)
    for p in kept:                                   # every shard left behind is whole and equal to one process's
        name = str(p.relative_to(two))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == reference[name]
    r = _torchrun([*args, "--store", two, "--workers", 0])
    assert f"{len(kept)} shard(s) already complete" in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert _contents(two) == reference


def test_pca_app_reads_a_store(store32, folder, tmp_path, golden_path, capsys, one_thread):
    """densevit-pca --store: the same pictures as running the model (float32 store, batch size 1)."""
    from densevit.apps.cli import pca as cli_pca

    ims = [str(folder / "cat0.jpg"), str(folder / "ibex1.png")]
    common = ["--layer", "9", "--facet", "key", "--bin", "--quiet"]
    assert cli_pca.entry(ims + ["--out", str(tmp_path / "a"), "--store", str(store32)] + common) == 0
    assert cli_pca.entry(ims + ["--out", str(tmp_path / "b"), "--weights", str(golden_path), "--stride", "8",
                                "--load-size", str(LOAD), "--device", "cpu"] + common) == 0
    for name in ("cat0_pca.png", "ibex1_pca.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert cli_pca.entry(ims + ["--out", str(tmp_path / "c"), "--store", str(store32), "--layer", "5"]) == 2
    assert "store holds layers [9, 11]" in capsys.readouterr().err


def _model_args(golden_path):
    return ["--weights", str(golden_path), "--stride", str(STRIDE), "--load-size", str(LOAD), "--device", "cpu"]


def _same_outputs(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("timings"), s.pop("seconds")
    assert sa == sb


def test_coseg_match_partseg_read_a_store(store32, folder, tmp_path, golden_path, one_thread):
    """densevit-coseg / -match / -partseg --store: the same masks, points and parts as running the model (float32
    store, batch size 1): descriptors, saliency, CLS descriptors, the resized input (GrabCut, CRF) all agree."""
    from densevit.apps.cli import coseg as cli_coseg
    from densevit.apps.cli import match as cli_match
    from densevit.apps.cli import partseg as cli_partseg

    ims = [str(folder / n) for n in ("cat0.jpg", "cat2.jpg", "ibex1.png")]
    same = ["--saliency-source", "same-pass"]          # a store holds the saliency of its own pass
    runs = [(cli_coseg, ims, ["--layer", "11", "--remove-outliers", "--outliers-thresh", "0.5"] + same,
             [f"{s}_{k}.png" for s in ("cat0", "cat2", "ibex1") for k in ("mask", "overlay")]),
            (cli_match, ims[:2], ["--layer", "9", "--bin", "--num-pairs", "5"],
             ["cat0_cat2_matches.png", "cat0_cat2_points.json"]),
            (cli_partseg, ims[:2], ["--layer", "11", "--num-parts", "2", "--crf", "approx"] + same,
             [f"{s}_{k}.png" for s in ("cat0", "cat2") for k in ("parts", "overlay")])]
    for app, inputs, flags, names in runs:
        a, b = tmp_path / f"{app.PROG}-store", tmp_path / f"{app.PROG}-model"
        # a backbone flag equal to the store's is fine
        assert app.entry(inputs + ["--out", str(a), "--store", str(store32), "--stride", str(STRIDE), "--quiet"]
                         + flags) == 0
        assert app.entry(inputs + ["--out", str(b), "--quiet"] + _model_args(golden_path) + flags) == 0
        _same_outputs(a, b, names)


@pytest.fixture(scope="module")
def plain_store(folder, tmp_path_factory, golden_path, one_thread):
    """A store of two images without saliency maps (layer 9, key)."""
    out = tmp_path_factory.mktemp("plain") / "store"
    assert _cli(folder / "cat0.jpg", folder / "ibex1.png", "--store", out, *_common(golden_path), "--layer", 9,
                "--workers", 0) == 0
    return out


@pytest.mark.parametrize("app, extra, message", [
    ("pca", ["--load-size", "224"], "--load-size 224 conflicts with store"),
    ("pca", ["--stride", "4"], "--stride 4 conflicts with store"),
    ("match", ["--weights", "random"], "--weights random conflicts with store"),
    ("coseg", ["--layer", "5"], "store holds layers [9, 11] and facets ['key', 'token'], not (5, key)"),
    ("match", ["--facet", "value"], "not (9, value)"),
    ("partseg", ["--num-crop-augmentations", "2"], "--num-crop-augmentations needs the model"),
    ("coseg", [], "--store holds the saliency of its own pass only: add --saliency-source same-pass"),
    ("partseg", [], "--store holds the saliency of its own pass only: add --saliency-source same-pass"),
])
def test_store_conflicts_refused_in_one_line(app, extra, message, store32, folder, tmp_path, capsys):
    import importlib

    cli = importlib.import_module(f"densevit.apps.cli.{app}")
    ims = [str(folder / "cat0.jpg"), str(folder / "cat1.jpg")]
    assert cli.entry(ims + ["--out", str(tmp_path / "o"), "--store", str(store32), "--quiet"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_store_without_saliency_or_image_refused(plain_store, store32, folder, tmp_path, capsys, one_thread):
    from densevit.apps.cli import coseg as cli_coseg
    from densevit.apps.cli import pca as cli_pca

    ims = [str(folder / "cat0.jpg"), str(folder / "ibex1.png")]
    assert cli_coseg.entry(ims + ["--out", str(tmp_path / "o"), "--store", str(plain_store), "--layer", "9"]) == 2
    err = capsys.readouterr().err
    assert "needs saliency maps" in err and "made without --saliency" in err and len(err.strip().splitlines()) == 1
    # an input image that is not in the store: its set fails with one line naming it (the others run)
    other = tmp_path / "other.jpg"
    Image.open(folder / "cat1.jpg").save(other)
    assert cli_pca.entry(ims + [str(other), "--out", str(tmp_path / "p"), "--store", str(plain_store),
                                "--layer", "9", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"image {other} is not in store" in err and "Traceback" not in err


def test_image_changed_since_extraction_refused(folder, tmp_path, golden_path, capsys, one_thread):
    from densevit.apps.cli import pca as cli_pca

    im = tmp_path / "cat.jpg"
    Image.open(folder / "cat0.jpg").save(im)
    assert _cli(im, "--store", tmp_path / "s", *_common(golden_path), "--layer", 9, "--workers", 0) == 0
    Image.open(folder / "cat0.jpg").resize((50, 40)).save(im)
    assert cli_pca.entry([str(im), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "s"), "--layer", "9",
                          "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{im} is 50x40 pixels but was" in err and "re-extract it" in err and "Traceback" not in err
