"""The rules every command shares (issue 21): no command writes into its inputs, ``--overwrite`` or not, and an
output path that is an existing file is one line, exit 2 (:func:`densevit.io.files.check_outputs`); huge
images (a decompression bomb) are refused by the one image reader and skipped like any unreadable image; every
command reports unreadable images with the same line and the same closing summary
(:func:`densevit.io.images.skip_unreadable` / :func:`~densevit.io.images.report_unreadable`).

Every command runs end to end with the golden random ViT-S/8 (built once: the extractor class is patched to
return the session's cached one), on 64x64 noise images."""
import hashlib
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from densevit.apps.cli import coseg as cli_coseg
from densevit.apps.cli import discover as cli_discover
from densevit.cli import index as cli_index
from densevit.apps.cli import match as cli_match
from densevit.apps.cli import partseg as cli_partseg
from densevit.apps.cli import pca as cli_pca
from densevit.apps.cli import vos as cli_vos
from PIL import Image

from densevit.cli import analyze as cli_analyze
from densevit.cli import extract as cli_extract
from densevit.errors import DensevitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

HUGE = 20000       # side of the decompression-bomb PNG (400 Mpixels, over PIL's and densevit's limit)


def _huge_png(path: Path, side: int = HUGE) -> None:
    """A valid 1-bit PNG of ``side`` x ``side`` white pixels, written without ever holding it in memory
    (about 60 kB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    z = zlib.compressobj(9)
    block = row * 500
    data = b"".join(z.compress(block) for _ in range(side // 500)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``good/``: two 64x64 noise images (frames of one size); ``mixed/``: the same plus a truncated JPEG and a
    20000x20000 PNG; a first-frame mask; a feature store of ``good/`` and a flat index of it."""
    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(21)
    for d in ("good", "mixed"):
        (root / d).mkdir()
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        img.save(root / "good" / f"{i:05d}.png")
        img.save(root / "mixed" / f"{i:05d}.png")
    jpg = root / "tmp.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=90)
    (root / "mixed" / "corrupt.jpg").write_bytes(jpg.read_bytes()[:300])
    _huge_png(root / "mixed" / "huge.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask0.png")
    return root


@pytest.fixture
def fast_model(monkeypatch, make_extractor, golden_path):
    """Every command's ViT-S/8 is the session's cached golden extractor (the flags still pass through)."""
    import densevit.features.extractor

    real = densevit.features.extractor.ViTExtractor

    def cached(backbone, stride=None, weights=None, device=None, dtype="float32", **kw):
        if backbone == "dino_vits8" and weights and Path(weights) == golden_path and dtype == "float32" and not kw:
            return make_extractor(stride)
        return real(backbone, stride=stride, weights=weights, device=device, dtype=dtype, **kw)

    monkeypatch.setattr(densevit.features.extractor, "ViTExtractor", cached)


@pytest.fixture(scope="module")
def store(data, golden_path):
    """A float32 feature store of ``good/`` and a flat patch index of it."""
    st = data / "store"
    if not st.exists():
        assert cli_extract.entry([str(data / "good"), "--store", str(st), "--weights", str(golden_path),
                                  "--stride", "8", "--load-size", "64", "--quiet", "--workers", "0",
                                  "--store-dtype", "float32", "--device", "cpu"]) == 0
        assert cli_index.entry(["build", str(st), "-o", str(data / "idx"), "--kind", "flat", "--quiet"]) == 0
    return st


def _model(golden_path, load_size="64", stride=None):
    return ["--weights", str(golden_path), "--device", "cpu", "--load-size", load_size] + (
        ["--stride", stride] if stride else [])


def _command(name, inputs, out, golden_path, data, store=None):
    """``(entry, argv)`` of command ``name`` reading ``inputs`` (a folder) and writing ``out``."""
    m = _model(golden_path)
    if name == "extract":
        return cli_extract.entry, [str(inputs), "-o", str(out), "--stride", "8"] + m
    if name == "extract-store":
        return cli_extract.entry, [str(inputs), "--store", str(out), "--stride", "8", "--workers", "0"] + m
    if name == "coseg":
        return cli_coseg.entry, [str(inputs), "--out", str(out), "--quiet", "--thresh", "0.3"] + m
    if name == "partseg":
        return cli_partseg.entry, [str(inputs), "--out", str(out), "--quiet", "--num-parts", "2", "--crf", "none",
                                   "--thresh", "0.3"] + m
    if name == "match":
        return cli_match.entry, [str(inputs), "--out", str(out), "--quiet", "--num-pairs", "2", "--thresh", "0.0"] + m
    if name == "pca":
        return cli_pca.entry, [str(inputs), "--out", str(out), "--quiet"] + m
    if name == "discover":
        return cli_discover.entry, [str(inputs), "--out", str(out), "--quiet", "--backbone", "dino_vits8",
                                    "--stride", "8"] + m
    if name == "vos":
        return cli_vos.entry, ["--frames", str(inputs), "--first-mask", str(data / "mask0.png"), "--out", str(out),
                               "--short-side", "64", "--quiet", "--weights", str(golden_path), "--device", "cpu"]
    if name == "analyze":
        return cli_analyze.entry, [str(inputs), "-o", str(out), "--analyses", "attention", "--layers", "11",
                                   "--stride", "8", "--no-progress"] + m
    if name == "index-build":
        return cli_index.entry, ["build", str(store), "-o", str(out), "--kind", "flat", "--quiet"]
    if name == "index-search":
        return cli_index.entry, ["search", str(data / "idx"), "--image", "00000.png", "--point", "30,30", "-k", "2",
                                 "--out", str(out)]
    raise AssertionError(name)


def _snapshot(folder: Path):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


READERS = ["extract", "extract-store", "coseg", "partseg", "match", "pca", "vos", "discover", "analyze"]


# ------------------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("name", READERS + ["index-build", "index-search"])
def test_no_command_writes_into_its_inputs_even_with_overwrite(name, data, store, golden_path, tmp_path, capsys,
                                                               fast_model):
    """`densevit-vos --frames F --out F --overwrite` replaced the frames; coseg with --out = its input folder
    read its own outputs. Output folder = input folder, inside it, or holding it: refused in one line, exit 2,
    nothing written."""
    src = tmp_path / "in"
    if name == "index-search":                       # reads the index, its store and the stored images
        src, watched = None, [store, data / "idx", data / "good"]
        cases = [store, store / "sub", data / "idx", data / "idx" / "sub", data, data / "good" / "search"]
    elif name == "index-build":                      # reads the store
        shutil.copytree(store, tmp_path / "in")
        watched, cases = [src], [src, src / "shards", tmp_path]
    else:
        shutil.copytree(data / "good", src)
        watched, cases = [src], [src, src / "sub", tmp_path]
    before = [_snapshot(w) for w in watched]
    for out in cases:                                # is, lies inside, contains an input folder
        entry, argv = _command(name, src, out, golden_path, data, store=src)
        code = entry(argv + ["--overwrite"])
        err = capsys.readouterr().err
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "no command writes into its inputs" in lines[0] and "Traceback" not in err
    assert [_snapshot(w) for w in watched] == before
    assert not (src / "sub").exists() if src is not None else not (data / "good" / "search").exists()


def test_an_output_file_that_is_an_input_is_refused(data, golden_path, tmp_path, capsys, fast_model):
    """--gif naming a frame or a file in the frames folder; an output file that is an input file."""
    from densevit.io.files import check_outputs

    frames = tmp_path / "frames"
    shutil.copytree(data / "good", frames)
    before = _snapshot(frames)
    entry, argv = _command("vos", frames, tmp_path / "out", golden_path, data)
    for gif in (frames / "00001.png", frames / "anim.gif"):
        assert entry(argv + ["--gif", str(gif), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "no command writes into its inputs" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(frames) == before
    with pytest.raises(DensevitError, match="is the input"):
        check_outputs([frames / "00000.png"], files=[frames / ".." / "frames" / "00000.png"], overwrite=True)


# ------------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("name", READERS + ["index-build", "index-search"])
def test_an_output_path_that_is_a_file_is_one_line(name, data, store, golden_path, tmp_path, capsys, fast_model):
    """`-o FILE` / `--out FILE` ended in a FileExistsError traceback."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    for out in (f, f / "below"):
        entry, argv = _command(name, data / "good", out, golden_path, data, store=store)
        for extra in ([], ["--overwrite"]):
            code = entry(argv + extra)
            err = capsys.readouterr().err
            assert code == 2, (out, extra, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err and str(f) in lines[0], err
            assert "not a folder" in lines[0] or "is a file" in lines[0]
    assert f.read_text() == "keep me"


def test_check_outputs_allows_what_is_fine(tmp_path):
    from densevit.io.files import check_outputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_mask.png").write_bytes(b"y")
    check_outputs([tmp_path / "in"], folders=[tmp_path / "out", tmp_path / "new" / "deeper"],
                  files=[tmp_path / "out" / "a_mask.png"], overwrite=True)
    check_outputs([tmp_path / "in" / "a.png"], folders=[tmp_path / "in" / "beside"])   # files given: their folder
    with pytest.raises(DensevitError, match="exists; pass --overwrite"):
        check_outputs([tmp_path / "in"], files=[tmp_path / "out" / "a_mask.png"])
    with pytest.raises(DensevitError, match="is a folder"):
        check_outputs(files=[tmp_path / "out"], overwrite=True)


# ------------------------------------------------------------------------------------------------ items 7 and 13
@pytest.mark.parametrize("name", READERS + ["extract-store"])
def test_huge_and_corrupt_images_are_skipped_with_one_wording_and_one_summary(name, data, golden_path, tmp_path,
                                                                              capsys, fast_model):
    """A 20000x20000 PNG ended every command in PIL's DecompressionBombError traceback (the images after it
    were not processed); densevit-extract -o said `error: cannot read image` with no summary. Now every command
    (and mode) prints one `skipping unreadable image` line per bad image and one closing summary, processes
    the two good images and exits 1."""
    out = tmp_path / "out"
    if name == "extract-store":
        entry = cli_extract.entry
        argv = [str(data / "mixed"), "--store", str(out), "--quiet", "--workers", "0", "--stride", "8"] + \
            _model(golden_path)
    else:
        entry, argv = _command(name, data / "mixed", out, golden_path, data)
    code = entry(argv)
    cap = capsys.readouterr()
    err = cap.err
    assert code == 1, err
    assert "Traceback" not in err
    prog = "densevit-" + name.split("-")[0]
    skip = [l for l in err.splitlines() if "skipping unreadable image" in l]
    assert len(skip) == 2 and all(l.startswith(f"{prog}: skipping unreadable image: cannot read image ")
                                  for l in skip), err
    huge = next(l for l in skip if "huge.png" in l)
    assert f"{HUGE}x{HUGE}" in huge and "DENSEVIT_MAX_PIXELS" in huge
    assert any("corrupt.jpg" in l for l in skip)
    summary = [l for l in err.splitlines() if "left out" in l]
    assert summary == [f"{prog}: 2 unreadable image(s) left out: corrupt.jpg, huge.png"], err
    written = {p.name for p in out.rglob("*")} if out.exists() else set()
    assert not any("huge" in n or "corrupt" in n for n in written)
    expect = {"extract": {"00000.npz", "00001.npz"}, "coseg": {"00000_mask.png", "00001_mask.png"},
              "partseg": {"00000_parts.png", "00001_parts.png"}, "match": {"00000_00001_points.json"},
              "pca": {"00000_pca.png", "00001_pca.png"}, "vos": {"00000.png", "00001.png"},
              "discover": {"00000_mask.png", "00001_mask.png"}, "analyze": {"summary.json"},
              "extract-store": {"manifest.json"}}[name]
    assert expect <= written, written


def test_index_search_refuses_a_huge_query_image_in_one_line(data, store, golden_path, tmp_path, capsys,
                                                              fast_model):
    argv = ["search", str(data / "idx"), "--image", str(data / "mixed" / "huge.png"), "--point", "30,30",
            "--weights", str(golden_path), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert cli_index.entry(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and f"{HUGE}x{HUGE}" in lines[0] and "huge.png" in lines[0]
    assert not (tmp_path / "o").exists()


def test_the_one_reader_applies_the_size_limit_everywhere(data, tmp_path, monkeypatch):
    """load_image, image_size, load_resized (the fast path), DAVIS masks, warp sources and VOS frame sizes all
    go through densevit.io.images.open_image; DENSEVIT_MAX_PIXELS moves the limit (0: none)."""
    from densevit.apps.vos import _frame_size

    from densevit.eval.datasets.davis import read_mask
    from densevit.eval.datasets.warp import load_source_image
    from densevit.io.images import (
        DEFAULT_MAX_PIXELS,
        UnreadableImageError,
        image_size,
        load_image,
        load_resized,
        max_pixels,
    )

    huge = data / "mixed" / "huge.png"
    assert max_pixels() == DEFAULT_MAX_PIXELS and 12000 * 12000 < DEFAULT_MAX_PIXELS < HUGE * HUGE
    readers = [load_image, image_size, lambda p: load_resized(p, 64), lambda p: load_resized(p, 64, True),
               read_mask, load_source_image, _frame_size]
    for read in readers:
        with pytest.raises(DensevitError, match=f"{HUGE}x{HUGE} is 400,000,000 pixels, more than the "
                                                f"{DEFAULT_MAX_PIXELS:,} allowed"):
            read(huge)
    with pytest.raises(UnreadableImageError):
        load_image(huge)
    under = tmp_path / "12k.png"                     # under the limit: read without PIL's bomb warning
    _huge_png(under, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(under) == (12000, 12000)
    monkeypatch.setenv("DENSEVIT_MAX_PIXELS", "0")              # no limit: the header reads (no decoding)
    assert image_size(huge) == (HUGE, HUGE)
    monkeypatch.setenv("DENSEVIT_MAX_PIXELS", str(64 * 64 - 1))
    with pytest.raises(UnreadableImageError, match="64x64 is 4,096 pixels, more than the 4,095 allowed"):
        load_image(data / "good" / "00000.png")
    monkeypatch.setenv("DENSEVIT_MAX_PIXELS", str(64 * 64))
    assert load_image(data / "good" / "00000.png").size == (64, 64)
    monkeypatch.setenv("DENSEVIT_MAX_PIXELS", "lots")
    with pytest.raises(DensevitError, match="DENSEVIT_MAX_PIXELS must be a whole number"):
        load_image(data / "good" / "00000.png")
