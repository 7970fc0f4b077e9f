"""Video object propagation: the local top-k search, sizes and ids on a real DAVIS sequence, tracking on a
constructed video, the CLI and the benchmark script (golden random ViT-S/8 weights, CPU, small frames)."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from densevit.apps.cli.vos import entry as vos_entry
from densevit.apps.vos import LocalTopK, VOSConfig, input_size, object_ids, propagate, propagate_labels
from PIL import Image

from densevit.errors import DensevitError
from densevit.eval.datasets.davis import DavisDataset, read_mask, write_mask
from densevit.eval.metrics.davis import db_eval_iou
from densevit.io.paths import golden_weights, repo_root, shared_dir

DAVIS = shared_dir() / "data" / "davis2016"
needs_golden = pytest.mark.skipif(not golden_weights().is_file(), reason="golden weights not available")
needs_davis = pytest.mark.skipif(not DAVIS.is_dir(), reason="shared DAVIS-2016 subset not available")


@pytest.fixture(scope="module")
def extractor():
    from densevit import ViTExtractor

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return ViTExtractor("dino_vits8", weights=str(golden_weights()), device="cpu")


# ------------------------------------------------------------------------------------------------ pieces
def test_input_size_is_dino_resize():
    assert input_size((480, 854)) == (480, 832)          # 480 * 854 / 480 = 854 -> floored to 832
    assert input_size((854, 480)) == (832, 480)
    assert input_size((480, 854), 480, 1) == (480, 854)
    assert input_size((480, 854), 160, 64) == (160, 256)  # 284.6 -> 256


@pytest.mark.parametrize("hw,radius,tile", [((13, 21), 3, 4), ((13, 21), 5, 16), ((9, 7), 2, 1),
                                            ((20, 30), 12, 16), ((6, 5), 12, 16), ((8, 8), 0, 16)])
def test_local_topk_matches_dense_masked_search(hw, radius, tile):
    torch.manual_seed(0)
    h, w = hw
    q = F.normalize(torch.randn(h * w, 24), dim=1)
    k = F.normalize(torch.randn(h * w, 24), dim=1)
    vals, idx = LocalTopK(hw, radius, tile, max_elems=4096)(q, k, 5)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    inside = ((ii[:, None] - ii[None]).abs() <= radius) & ((jj[:, None] - jj[None]).abs() <= radius)
    if radius <= 0:
        inside[:] = True
    ref_vals, ref_idx = (q @ k.T).masked_fill(~inside, float("-inf")).topk(5, dim=1)
    torch.testing.assert_close(vals, ref_vals)
    assert torch.equal(idx, ref_idx)


def test_propagate_labels_is_softmax_of_topk_over_context():
    torch.manual_seed(1)
    T, D = 12, 8
    q = F.normalize(torch.randn(T, D), dim=1)
    keys = [F.normalize(torch.randn(T, D), dim=1) for _ in range(3)]
    labels = [F.one_hot(torch.randint(0, 3, (T,)), 3).float() for _ in range(3)]
    out = propagate_labels(q, keys, labels, LocalTopK((3, 4), 0), topk=4, temperature=0.1)
    sims = torch.cat([q @ k.T for k in keys], 1)                    # T x 3T
    v, i = sims.topk(4, dim=1)
    w = torch.exp(v / 0.1)
    ref = (w[..., None] * torch.cat(labels)[i]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out.sum(1), torch.ones(T))


def test_object_ids_and_bad_masks(extractor):
    assert object_ids(np.array([[7, 0], [3, 7]])) == [0, 3, 7]
    assert object_ids(np.array([[5, 5]])) == [0, 5]
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    with pytest.raises(DensevitError):
        next(propagate(extractor, frames, np.zeros((32, 64), np.uint8), VOSConfig(short_side=64)))
    with pytest.raises(DensevitError):
        list(propagate(extractor, frames + [np.zeros((64, 72, 3), np.uint8)], np.zeros((64, 64), np.uint8),
                       VOSConfig(short_side=64)))


# ------------------------------------------------------------------------------------------------ real video
@needs_golden
@needs_davis
def test_real_sequence_sizes_and_ids(extractor):
    ds = DavisDataset(DAVIS, "2016", "val", sequences=["blackswan"])
    frames = ds.frames("blackswan")[:3]
    first = ds.first_mask("blackswan")
    # make it multi-object with arbitrary ids: the swan's left part id 9, its right part id 4
    cols = np.nonzero(first.any(0))[0]
    split = (cols.min() + cols.max()) // 2
    multi = np.zeros_like(first)
    multi[:, :split][first[:, :split] > 0] = 9
    multi[:, split:][first[:, split:] > 0] = 4
    masks = list(propagate(extractor, frames, multi, VOSConfig(short_side=128, batch_size=2)))
    assert len(masks) == len(frames)
    np.testing.assert_array_equal(masks[0], multi)
    for m in masks:
        assert m.shape == (480, 854) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 4, 9}
    assert {4, 9} <= set(np.unique(masks[1]))
    gt, _ = ds.ground_truth("blackswan")
    assert db_eval_iou(gt[1] > 0, masks[1] > 0) > 0.3       # random weights: a sanity bound only


@needs_golden
@needs_davis
def test_bfloat16_masks_agree_with_float32(extractor):
    """The issue's precision check: propagation with a bfloat16 backbone labels >= 99% of pixels as float32."""
    from densevit import ViTExtractor

    ext16 = ViTExtractor("dino_vits8", weights=str(golden_weights()), device="cpu", dtype="bfloat16")
    assert next(ext16.model.parameters()).dtype == torch.bfloat16
    ds = DavisDataset(DAVIS, "2016", "val", sequences=["blackswan"])
    frames, first = ds.frames("blackswan")[:6], ds.first_mask("blackswan")
    cfg = VOSConfig(short_side=96, batch_size=3)
    a = np.stack(list(propagate(extractor, frames, first, cfg))[1:])
    b = np.stack(list(propagate(ext16, frames, first, cfg))[1:])
    assert (a > 0).mean() > 0.01 and (a == 0).mean() > 0.5          # a real split, not an empty mask
    assert (a == b).mean() >= 0.99


def test_unreadable_frame_is_reported(tmp_path, extractor):
    frames = [np.zeros((64, 64, 3), np.uint8), tmp_path / "broken.jpg", np.zeros((64, 64, 3), np.uint8)]
    frames[1].write_bytes(b"not a jpeg")
    with pytest.raises(DensevitError, match="broken.jpg"):
        list(propagate(extractor, frames, np.zeros((64, 64), np.uint8), VOSConfig(short_side=64, batch_size=2)))


# ------------------------------------------------------------------------------------------------ tracking
def translating_video(n=6, H=128, W=192, step=(8, 8), seed=0):
    """A 40x40 blocky random texture moving over a smooth background by ``step`` pixels a frame.

    The motion is a whole number of tokens (stride 8) per frame and the object's edges lie on token edges:
    with random weights the features only match identical patch contents, which sub-token motion does not
    preserve, and a mask edge inside a token is only resolved to the token (a 4-pixel error on a 40-pixel
    object costs J about 0.3).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    bg = np.stack([90 + 40 * np.sin(xx / 11.0), 120 + 30 * np.cos(yy / 9.0), 100 + 20 * np.sin((xx + yy) / 15.0)], -1)
    bg = np.clip(bg + rng.normal(0, 3, bg.shape), 0, 255)
    tex = rng.integers(0, 256, (10, 10, 3)).repeat(4, 0).repeat(4, 1)
    frames, masks = [], []
    for f in range(n):
        img, m = bg.copy(), np.zeros((H, W), np.uint8)
        y0, x0 = 16 + step[0] * f, 24 + step[1] * f
        img[y0:y0 + 40, x0:x0 + 40] = tex
        m[y0:y0 + 40, x0:x0 + 40] = 2
        frames.append(img.astype(np.uint8))
        masks.append(m)
    return frames, masks


@needs_golden
def test_tracks_translating_object(extractor):
    frames, masks = translating_video()
    out = list(propagate(extractor, frames, masks[0], VOSConfig(short_side=128)))  # DINO defaults otherwise
    js = [db_eval_iou(masks[i] == 2, out[i] == 2) for i in range(1, len(frames))]
    assert min(js) >= 0.8, js
    assert all(set(np.unique(m)) <= {0, 2} for m in out)


# ------------------------------------------------------------------------------------------------ CLI
@needs_golden
@needs_davis
def test_cli_writes_indexed_pngs_and_gif(tmp_path, extractor, monkeypatch):
    import densevit.apps.cli.vos as cli

    built = []
    monkeypatch.setattr(cli, "build_extractor", lambda args: built.append(args) or extractor)
    src = DAVIS / "JPEGImages" / "480p" / "dog"
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for p in sorted(src.glob("*.jpg"))[:3]:
        (frames_dir / p.name).symlink_to(p)
    first = DAVIS / "Annotations" / "480p" / "dog" / "00000.png"      # greyscale 0/255
    out = tmp_path / "out"
    args = ["--frames", str(frames_dir), "--first-mask", str(first), "--out", str(out), "--gif",
            str(tmp_path / "o.gif"), "--weights", str(golden_weights()), "--short-side", "96", "--device", "cpu",
            "--quiet"]
    assert vos_entry(args) == 0
    assert len(built) == 1 and built[0].weights == str(golden_weights()) and built[0].layer == -1
    assert built[0].facet == "token_norm" and built[0].stride is None
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "P" and im.size == (854, 480)
        assert set(np.unique(read_mask(p))) <= {0, 1}         # a 0/255 first mask is object 1
    np.testing.assert_array_equal(read_mask(pngs[0]), (read_mask(first) > 0).astype(np.uint8))
    with Image.open(tmp_path / "o.gif") as gif:
        assert gif.n_frames == 3
    assert vos_entry(args) == 2                                     # outputs exist: refused without --overwrite


@needs_golden
@needs_davis
def test_cli_leaves_out_unreadable_frame(tmp_path, extractor, monkeypatch, capsys):
    import densevit.apps.cli.vos as cli

    monkeypatch.setattr(cli, "build_extractor", lambda args: extractor)
    src = DAVIS / "JPEGImages" / "480p" / "dog"
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for p in sorted(src.glob("*.jpg"))[:3]:
        (frames_dir / p.name).symlink_to(p)
    (frames_dir / "00001b.jpg").write_bytes(b"not a frame")
    first = DAVIS / "Annotations" / "480p" / "dog" / "00000.png"
    out = tmp_path / "out"
    args = ["--frames", str(frames_dir), "--first-mask", str(first), "--out", str(out), "--short-side", "64",
            "--device", "cpu", "--quiet"]
    assert vos_entry(args) == 1
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "00001b.jpg" in err and "1 unreadable image(s) left out" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    (frames_dir / "00000.jpg").unlink()
    (frames_dir / "00000.jpg").write_bytes(b"broken first frame")
    assert vos_entry(args + ["--overwrite"]) == 2
    assert "first frame 00000.jpg is unreadable" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert vos_entry(["--frames", str(tmp_path / "none"), "--first-mask", "x.png", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densevit-vos: error:")


# ------------------------------------------------------------------------------------------------ benchmark
def _load_benchmark(name="davis"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", repo_root() / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_golden
@needs_davis
def test_benchmark_script_writes_toolkit_csvs(tmp_path, extractor, monkeypatch, capsys):
    bench = _load_benchmark()
    built = []
    monkeypatch.setattr(bench, "build_extractor", lambda args: built.append(args) or extractor)
    argv = ["--sequences", "car-shadow", "--max-frames", "3", "--short-side", "64",
            "--weights", str(golden_weights()), "--out", str(tmp_path), "--quiet"]
    assert bench.entry(argv) == 0
    assert len(built) == 1 and built[0].backbone == "dino_vits8" and built[0].stride is None
    head = (tmp_path / "global_results-val.csv").read_text().splitlines()
    assert head[0] == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay" and len(head) == 2
    seq = (tmp_path / "per-sequence_results-val.csv").read_text().splitlines()
    assert seq[0] == "Sequence,J-Mean,F-Mean" and seq[1].startswith("car-shadow_1,")
    assert len(list((tmp_path / "car-shadow").glob("*.png"))) == 3
    assert "J&F-Mean" in capsys.readouterr().out
    # resumable: nothing left to propagate, so no model is built; other settings are refused
    assert bench.entry(argv) == 0 and len(built) == 1
    assert bench.entry(argv + ["--topk", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert bench.entry(argv + ["--topk", "3", "--recompute"]) == 0 and len(built) == 2


@needs_golden
def test_benchmark_on_constructed_davis2017(tmp_path, extractor, monkeypatch, capsys):
    """Multi-object DAVIS-2017 layout (palette masks, void pixels) through the benchmark script."""
    root = tmp_path / "DAVIS"
    frames, masks = translating_video(n=4)
    patch = np.random.default_rng(1).integers(0, 256, (4, 8, 3)).repeat(4, 0).repeat(4, 1)
    for f, (img, m) in enumerate(zip(frames, masks)):
        m = m.copy()
        m[m == 2] = 1
        img = img.copy()
        img[96:112, 128:160] = patch               # a second, static textured object
        m[96:112, 128:160] = 2
        m[0, :] = 255                              # void
        (root / "JPEGImages" / "480p" / "toy").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "JPEGImages" / "480p" / "toy" / f"{f:05d}.jpg", quality=98)
        write_mask(root / "Annotations" / "480p" / "toy" / f"{f:05d}.png", m)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("toy\n")
    bench = _load_benchmark()
    monkeypatch.setattr(bench, "build_extractor", lambda args: extractor)
    out = tmp_path / "res"
    assert bench.entry(["--davis-root", str(root), "--year", "2017", "--short-side", "128", "--out", str(out),
                        "--quiet"]) == 0
    rows = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["Sequence", "toy_1", "toy_2"]
    assert all(float(r.split(",")[1]) >= 0.8 for r in rows[1:]), rows
    assert set(np.unique(read_mask(out / "toy" / "00003.png"))) <= {0, 1, 2}


def test_compare_masks_reports_agreement_and_score_difference(tmp_path, capsys):
    cmp = _load_benchmark("compare_masks")
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    for seq, n_diff in (("s1", 0), ("s2", 5)):
        for f in range(3):
            m = np.zeros((10, 20), np.uint8)
            m[2:8, 4:12] = 1
            write_mask(a / seq / f"{f:05d}.png", m)
            if f == 2:
                m.flat[:n_diff] = 1                         # frame 2 of s2 differs in 5 of 200 pixels
            write_mask(b / seq / f"{f:05d}.png", m)
    (a / "global_results-val.csv").write_text("J&F-Mean,J-Mean,F-Mean\n0.500,0.600,0.400\n")
    (b / "global_results-val.csv").write_text("J&F-Mean,J-Mean,F-Mean\n0.497,0.601,0.393\n")
    assert cmp.entry([str(a), str(b), "--out", str(tmp_path / "r.json")]) == 0
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["sequences"]["s1"]["agree"] == 1.0 and res["sequences"]["s1"]["frames"] == 2
    assert res["sequences"]["s2"]["agree"] == pytest.approx(395 / 400)
    assert res["sequences"]["s2"]["worst_frame"] == pytest.approx(195 / 200)
    assert res["agree"] == pytest.approx(795 / 800)
    out = capsys.readouterr().out
    assert "J&F-Mean" in out and "-0.003" in out
    assert cmp.entry([str(a), str(b), "--out", str(tmp_path / "r.json"), "--require", "0.999"]) == 1
    assert cmp.entry([str(a), str(b), "--out", str(tmp_path / "r.json"), "--require", "0.99"]) == 0
    (b / "s2" / "00001.png").unlink()
    assert cmp.entry([str(a), str(b), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("benchmarks/compare_masks.py: error:") and "lacks 1 of the 3" in err[-1]
    assert cmp.entry([str(a), str(tmp_path / "none")]) == 2


@needs_golden
@needs_davis
def test_benchmark_under_torchrun_equals_one_process(tmp_path):
    """Two gloo processes split the sequences; rank 0 scores them all: the same masks and CSVs as one process."""
    import os
    import subprocess
    import sys

    argv = ["--sequences", "car-shadow,dog,blackswan", "--max-frames", "3", "--short-side", "64",
            "--weights", str(golden_weights()), "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(repo_root() / "benchmarks" / "davis.py")
    one = subprocess.run([sys.executable, script, *argv, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, *argv, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("J&F-Mean") == 1                        # only rank 0 scores and prints
    for name in ("global_results-val.csv", "per-sequence_results-val.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    for seq in ("car-shadow", "dog", "blackswan"):
        for p in sorted((tmp_path / "one" / seq).glob("*.png")):
            np.testing.assert_array_equal(read_mask(p), read_mask(tmp_path / "two" / seq / p.name))
