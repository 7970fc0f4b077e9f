"""Issue 31's fault harness for bad inputs: every command run against zero-byte, garbage, text, pickled-code and
NaN weights (``--weights``, ``$DENSEVIT_WEIGHTS``, ``analyze --compare``, ``--upsample-weights``), a too-small
image in a set, and out-of-range bounds. Each answers with one line naming the file (or the flag), the right exit
code, no traceback, nothing written; a set still processes its other images. Runs the commands in-process on
64-pixel images (the golden ViT-S/8 weights), in well under a minute."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densevit.apps.cli import coseg as cli_coseg
from densevit.apps.cli import discover as cli_discover
from densevit.cli import index as cli_index
from densevit.apps.cli import match as cli_match
from densevit.apps.cli import partseg as cli_partseg
from densevit.apps.cli import pca as cli_pca
from densevit.apps.cli import vos as cli_vos
from densevit.cli import analyze as cli_analyze
from densevit.cli import extract as cli_extract

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, golden_path):
    """``good/`` (3 noise images, 64 px), ``set/`` (the same plus a 1x1 ``tiny.png``), ``video/`` (frames, one of
    them 4x4), a first-frame mask, bad weights files, and a store of ``good/`` with a flat index."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(31)
    for d in ("good", "set", "video"):
        (root / d).mkdir()
    for i in range(3):
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        for d in ("good", "set", "video"):
            img.save(root / d / f"{i:05d}.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "set" / "tiny.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "query.png")  # not stored
    Image.new("RGB", (4, 4), (200, 10, 10)).save(root / "video" / "00001b.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask0.png")
    w = root / "weights"
    w.mkdir()
    (w / "empty.pth").write_bytes(b"")
    (w / "garbage.pth").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (w / "text.pth").write_text("model = dino_vits8\n")

    class Code:
        def __reduce__(self):
            return (os.system, ("echo code from a checkpoint ran",))

    torch.save({"x": Code()}, w / "pickled.pth")
    sd = torch.load(golden_path, weights_only=True)
    sd["blocks.5.mlp.fc1.weight"] = sd["blocks.5.mlp.fc1.weight"] * float("nan")
    torch.save(sd, w / "nan.pth")
    st = root / "store"
    assert cli_extract.entry([str(root / "good"), "--store", str(st), "--weights", str(golden_path), "--stride",
                              "8", "--load-size", "64", "--quiet", "--workers", "0", "--store-dtype", "float32",
                              "--device", "cpu"]) == 0
    assert cli_index.entry(["build", str(st), "-o", str(root / "idx"), "--kind", "flat", "--quiet"]) == 0
    return root


def _command(name, inputs, out, weights, data):
    """``(entry, argv)`` of command ``name`` reading ``inputs`` (a folder), writing ``out``, with ``weights``."""
    m = ["--weights", str(weights), "--device", "cpu", "--load-size", "64"]
    if name == "extract":
        return cli_extract.entry, [str(inputs), "-o", str(out), "--stride", "8"] + m
    if name == "extract-store":
        return cli_extract.entry, [str(inputs), "--store", str(out), "--stride", "8", "--workers", "0",
                                   "--quiet"] + m
    if name == "coseg":
        return cli_coseg.entry, [str(inputs), "--out", str(out), "--quiet", "--thresh", "0.3"] + m
    if name == "partseg":
        return cli_partseg.entry, [str(inputs), "--out", str(out), "--quiet", "--num-parts", "2", "--crf", "none",
                                   "--thresh", "0.3"] + m
    if name == "match":
        return cli_match.entry, [str(inputs / "00000.png"), str(inputs / "00001.png")]\
            + ([str(inputs / "tiny.png")] if (inputs / "tiny.png").exists() else []) \
            + ["--out", str(out), "--quiet", "--num-pairs", "2", "--thresh", "0.0"] + m
    if name == "pca":
        return cli_pca.entry, [str(inputs), "--out", str(out), "--quiet"] + m
    if name == "discover":
        return cli_discover.entry, [str(inputs), "--out", str(out), "--quiet", "--backbone", "dino_vits8",
                                    "--stride", "8"] + m
    if name == "vos":
        return cli_vos.entry, ["--frames", str(inputs), "--first-mask", str(data / "mask0.png"), "--out", str(out),
                               "--short-side", "64", "--quiet", "--weights", str(weights), "--device", "cpu"]
    if name == "analyze":
        return cli_analyze.entry, [str(inputs), "-o", str(out), "--analyses", "attention", "--layers", "11",
                                   "--stride", "8", "--no-progress"] + m
    if name == "index-search":       # a query image not in the store is extracted with --weights
        return cli_index.entry, ["search", str(data / "idx"), "--image", str(data / "query.png"), "--point",
                                 "30,30", "-k", "2", "--out", str(out), "--weights", str(weights)]
    raise AssertionError(name)


COMMANDS = ["extract", "extract-store", "coseg", "partseg", "match", "pca", "discover", "vos", "analyze",
            "index-search"]
BAD_WEIGHTS = {"empty": "empty (0 bytes)", "garbage": "not a PyTorch", "text": "not a PyTorch",
               "pickled": "pickles objects other than tensors", "nan": "non-finite values"}


def _one_error_line(err: str, prog_words: str) -> str:
    assert "Traceback" not in err and "code from a checkpoint ran" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and prog_words in lines[0], lines[0]
    return lines[0]


def _files(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
@pytest.mark.parametrize("name", COMMANDS)
def test_bad_weights_are_one_line_naming_the_file(data, tmp_path, capsys, name, kind):
    weights = data / "weights" / f"{kind}.pth"
    out = tmp_path / "out"
    entry, argv = _command(name, data / "good", out, weights, data)
    assert entry(argv) == 2
    line = _one_error_line(capsys.readouterr().err, str(weights))
    # a query for an index must use the store's weights: any other file is refused by its fingerprint first
    assert (BAD_WEIGHTS[kind] if name != "index-search" else "are not the ones the store was extracted") in line
    assert _files(out) == []


@pytest.mark.parametrize("kind", ["empty", "nan"])
def test_bad_weights_found_through_the_environment(data, tmp_path, capsys, monkeypatch, kind):
    """$DENSEVIT_WEIGHTS holding a bad file under the backbone's conventional name (the 0-byte one crashed in the
    error-message code)."""
    env = tmp_path / "env"
    env.mkdir()
    (env / "dino_deitsmall8_pretrain.pth").symlink_to(data / "weights" / f"{kind}.pth")
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(env))
    argv = [str(data / "good"), "-o", str(tmp_path / "out"), "--stride", "8", "--load-size", "64", "--device", "cpu"]
    assert cli_extract.entry(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "dino_deitsmall8_pretrain.pth")
    assert BAD_WEIGHTS[kind] in line


@pytest.mark.parametrize("kind", ["empty", "pickled", "nan"])
def test_analyze_compare_with_bad_weights(data, tmp_path, capsys, golden_path, kind):
    weights = data / "weights" / f"{kind}.pth"
    entry, argv = _command("analyze", data / "good", tmp_path / "out", golden_path, data)
    assert entry(argv + ["--compare", f"dino_vits8={weights}"]) == 2
    assert BAD_WEIGHTS[kind] in _one_error_line(capsys.readouterr().err, str(weights))


@pytest.mark.parametrize("kind", ["empty", "garbage", "pickled"])
def test_bad_upsample_weights(data, tmp_path, capsys, golden_path, kind):
    """An empty or pickled --upsample-weights was an EOFError / UnpicklingError traceback."""
    weights = data / "weights" / f"{kind}.pth"
    entry, argv = _command("extract", data / "good", tmp_path / "out", golden_path, data)
    assert entry(argv + ["--upsample", "anyup", "--upsample-weights", str(weights)]) == 2
    _one_error_line(capsys.readouterr().err, str(weights))
    entry, argv = _command("coseg", data / "good", tmp_path / "out2", golden_path, data)
    assert entry(argv + ["--upsample", "anyup", "--upsample-weights", str(weights)]) == 2
    _one_error_line(capsys.readouterr().err, str(weights))


@pytest.mark.parametrize("name", ["coseg", "partseg", "pca", "match", "analyze", "discover", "extract", "vos"])
def test_a_too_small_image_is_named_and_skipped(data, tmp_path, capsys, golden_path, name):
    """A 1x1 image sank the whole set in coseg, partseg, pca and match (no file named) and stopped analyze."""
    out = tmp_path / "out"
    inputs = data / ("video" if name == "vos" else "set")
    entry, argv = _command(name, inputs, out, golden_path, data)
    assert entry(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    tiny = "00001b.png" if name == "vos" else "tiny.png"
    named = [ln for ln in err.splitlines() if tiny in ln]
    assert named and any("pixels, smaller than the 8-pixel patch" in ln for ln in named), err
    assert "set set: error" not in err
    written = [p.name for p in _files(out)]
    assert written and not any(p.startswith("tiny") or p.startswith("00001b") for p in written), written
    if name in ("coseg", "partseg", "pca"):
        assert {f"0000{i}" for i in range(3)} <= {p.split("_")[0] for p in written}, written


# ------------------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize("flags,words", [
    (["--kind", "hnsw", "--hnsw-m", "-3"], "--hnsw-m"), (["--kind", "hnsw", "--hnsw-m", "0"], "--hnsw-m"),
    (["--kind", "ivf-flat", "--nlist", "100000"], "--nlist 100000 is more lists"),
    (["--kind", "ivf-flat", "--nlist", "-4"], "--nlist"), (["--kind", "ivf-pq", "--pq-m", "0"], "--pq-m"),
    (["--kind", "ivf-pq", "--pq-m", "-2"], "--pq-m"), (["--kind", "ivf-pq", "--pq-m", "7"], "must divide")])
def test_index_build_parameters_are_one_line(data, tmp_path, capsys, flags, words):
    """--hnsw-m -3 grew to 21.5 GB; 0 aborted in FAISS (exit 134); nlist past the vectors a FAISS traceback."""
    out = tmp_path / "ix"
    assert cli_index.entry(["build", str(data / "store"), "-o", str(out), "--quiet"] + flags) == 2
    assert words in _one_error_line(capsys.readouterr().err, "densevit-index")
    assert _files(out) == []


def test_index_search_nprobe_zero_is_refused(data, tmp_path, capsys):
    argv = ["search", str(data / "idx"), "--image", "00000.png", "--point", "30,30", "-k", "2", "--out",
            str(tmp_path / "o")]
    assert cli_index.entry(argv + ["--nprobe", "0"]) == 2
    assert "--nprobe" in _one_error_line(capsys.readouterr().err, "densevit-index")


@pytest.mark.parametrize("name,flags,words", [
    ("vos", ["--upsample", "bilinear", "--upsample-factor", "3"], "does not divide the 8-pixel patch"),
    ("vos", ["--upsample-factor", "2"], "applies to --upsample"),
    ("discover", ["--max-tokens", "0"], "--max-tokens"), ("discover", ["--max-tokens", "-5"], "--max-tokens"),
    ("extract", ["--upsample", "jbu", "--upsample-weights", "random"], "--upsample-weights applies to"),
    ("coseg", ["--upsample", "jbu", "--upsample-weights", "random"], "--upsample-weights applies to"),
    ("extract", ["--upsample", "bilinear", "--load-size", "512"], "--max-output-mib"),
])
def test_flags_out_of_range_are_one_line_before_work(data, tmp_path, capsys, golden_path, name, flags, words):
    entry, argv = _command(name, data / "good", tmp_path / "out", golden_path, data)
    assert entry(argv + flags) == 2
    assert words in _one_error_line(capsys.readouterr().err, "densevit-")
    assert _files(tmp_path / "out") == []


def test_bad_max_pixels_is_one_line_before_any_work(data, tmp_path, capsys, golden_path, monkeypatch):
    """It failed image by image after the model ran (extract: one error per image, exit 1)."""
    monkeypatch.setenv("DENSEVIT_MAX_PIXELS", "lots")
    for name in ("extract", "coseg"):
        entry, argv = _command(name, data / "good", tmp_path / name, golden_path, data)
        assert entry(argv) == 2
        assert "DENSEVIT_MAX_PIXELS" in _one_error_line(capsys.readouterr().err, f"densevit-{name}")
        assert _files(tmp_path / name) == []


def test_missing_anyup_weights_is_one_line_up_front(data, tmp_path, capsys, golden_path, monkeypatch):
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("extract", "coseg"):
        entry, argv = _command(name, data / "good", tmp_path / name, golden_path, data)
        assert entry(argv + ["--upsample", "anyup"]) == 2
        line = _one_error_line(capsys.readouterr().err, "AnyUp weights not found")
        assert "--upsample-weights FILE" in line and "weights=" not in line


# ------------------------------------------------------------------------------------------------ words
def test_a_fifo_is_named_as_a_fifo(data, tmp_path, capsys, golden_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for name in ("extract", "extract-store"):
        entry, argv = _command(name, fifo, tmp_path / name, golden_path, data)
        assert entry(argv) == 2
        assert "is a FIFO" in _one_error_line(capsys.readouterr().err, str(fifo))


def test_same_key_from_two_folders_says_so(data, tmp_path, capsys, golden_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / d / "cat.png")
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--store", str(tmp_path / "st"), "--weights",
            str(golden_path), "--load-size", "64"]
    assert cli_extract.entry(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "'cat.png'")
    assert "separate folders" not in line and str(tmp_path / "a" / "cat.png") in line


def test_a_huge_click_is_a_short_line(make_extractor, golden_path, noise_pair):
    from densevit.apps.explore.session import Explorer
    from densevit.errors import DensevitError

    ex = Explorer(extractor=make_extractor(8), weights=str(golden_path), load_size=56)
    ex.add_image(noise_pair[0], "a")
    with pytest.raises(DensevitError) as got:
        ex.similarity(0, 1e300, 3.0, ex.defaults)
    assert len(str(got.value)) < 120 and "1e+300" in str(got.value)


def test_a_pca_save_names_no_replay_and_replay_says_why(tmp_path, capsys):
    import json

    from densevit.apps.cli import explore as cli_explore

    rec = {"backbone": "dino_vits8", "mode": "pca", "settings": {"layer": 11}, "images": []}
    (tmp_path / "pca.json").write_text(json.dumps(rec))
    assert cli_explore.entry(["--replay", str(tmp_path / "pca.json")]) == 2
    line = _one_error_line(capsys.readouterr().err, "pca view without a clicked point")
    assert "'clicked'" not in line
