"""Label propagation beyond object masks: CRW's protocol (pose tracking on JHMDB, part tracking on VIP), its scorers,
and keypoint tracking in densevit-vos.

Conformance fixture ``tests/fixtures/propagation_crw.npz``: CRW's reference code (github ajabri/videowalk, commit
047f3f4: ``code/test.py``, ``code/eval/eval_pck.py``, ``code/eval/eval_vip.py``) run once on the CPU on the small
videos of ``tests/propagation_data.py`` (JHMDB layout: 2 videos of 6 and 5 frames, 144x80 and 120x90, one with a
joint outside frame 0; VIP layout: 2 videos of 5 frames, 96x128 and 128x72, part ids 2/4/8 and a left shoe (19)
in frame 0 only). The model construction was replaced by a wrapper giving ``B x C x T x h x w`` maps of densevit's
golden random ViT-S/8 (``shared/golden/vits8_random_fp16.pth``, float32; last block's patch tokens after the final
norm); besides, only missing imports were patched (``scipy.io`` in ``data/jhmdb.py``, ``utils.vis_pose``; stubs for
visdom, wandb, skimage and imageio, whose ``imwrite`` wrote the PNGs through PIL) and, for ``eval_vip.py``, the
prediction folder held only the label PNGs (it would also list ``test.py``'s ``*_blend.jpg``). Settings
(``--cropSize --videoLen --topk --radius --temperature``): jhmdb_a 96 4 10 5 0.07, jhmdb_b 64 20 5 12 0.05, vip_a 64
3 5 3 0.07, vip_b 96 20 10 12 0.07. Stored: ``test.py``'s joints in cells (``<i>.dat``), the pixel predictions and
PCK of ``eval_pck.py`` (``feat_res`` = crop / 8), the label PNGs of ``test.py`` (crop x crop) and the histogram,
per-class IoU and mIoU of ``eval_vip.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import propagation_data as pdata  # noqa: E402

from densevit.apps.propagation import (CRWConfig, crw_propagate, draw_gaussian,  # noqa: E402
                                       part_onehots, part_readout, pose_heatmaps, pose_readout,
                                       propagate_soft, radius_bias)
from densevit.errors import DensevitError  # noqa: E402
from densevit.eval.datasets.jhmdb import jhmdb_frames, jhmdb_joints, read_filelist  # noqa: E402
from densevit.eval.metrics.propagation import (jhmdb_distances, jhmdb_pck, vip_confusion,  # noqa: E402
                                               vip_frame_hist, vip_iou)

FIXTURE = Path(__file__).parent / "fixtures" / "propagation_crw.npz"
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _cfg(ref, run) -> CRWConfig:
    return CRWConfig(context=int(ref[f"{run}/ctx"]), topk=int(ref[f"{run}/topk"]), radius=float(ref[f"{run}/radius"]),
                     temperature=float(ref[f"{run}/temp"]), crop_size=int(ref[f"{run}/crop"]))


@pytest.fixture(scope="module")
def jhmdb(shared, tmp_path_factory):
    return pdata.make_jhmdb(tmp_path_factory.mktemp("jhmdb"), shared)


@pytest.fixture(scope="module")
def vip(shared, tmp_path_factory):
    return pdata.make_vip(tmp_path_factory.mktemp("VIP"), shared)


# ------------------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("run", ["jhmdb_a", "jhmdb_b"])
def test_crw_joints_match_reference(run, ref, jhmdb, make_extractor, one_thread):
    """Joints in cells within one feature cell of test.py's for >= 95 % of (frame, joint) pairs; frame 0 exact."""
    cfg, ext = _cfg(ref, run), make_extractor(8)
    close = total = 0
    for i, (frames, mat) in enumerate(read_filelist(jhmdb)):
        frames, gt = jhmdb_frames(frames), jhmdb_joints(mat)
        hw = cv2.imread(str(frames[0])).shape[:2]
        first = pose_heatmaps(gt[:, :, 0].T, hw, cfg.crop_size, 8)
        ours = np.stack([pose_readout(p).numpy() for p in propagate_soft(ext, frames, first, cfg)], -1)
        want = ref[f"{run}/coords{i}"]
        assert ours.shape == want.shape
        np.testing.assert_allclose(ours[..., 0], want[..., 0], atol=1e-5)
        diff = np.abs(ours - want).max(0)                                  # joints x frames
        close += int((diff <= 1).sum())
        total += diff.size
    assert close / total >= 0.95, f"{close}/{total} within one cell"


@pytest.mark.parametrize("run", ["vip_a", "vip_b"])
def test_crw_parts_match_reference(run, ref, vip, load_benchmark, tmp_path, golden_path, one_thread):
    """benchmarks/vip.py's part maps equal test.py's (resized as eval_vip.py resizes them) on >= 99 % of pixels;
    every frame written, at its original size."""
    cfg = _cfg(ref, run)
    bench = load_benchmark("vip")
    out = tmp_path / "out"
    argv = ["--filelist", str(vip), "--out", str(out), "--crop-size", str(cfg.crop_size), "--context",
            str(cfg.context), "--topk", str(cfg.topk), "--radius", str(cfg.radius), "--temperature",
            str(cfg.temperature), "--weights", str(golden_path), "--quiet"]
    assert bench.entry(argv) == 0
    same = total = 0
    for key in (k for k in ref if k.startswith(f"{run}/pred/")):
        vid, frame = key.split("/")[2:]
        ours = np.array(Image.open(out / vid / f"{frame}.png"))
        gt = np.array(Image.open(vip.parent / "Annotations" / "Category_ids" / vid / f"{frame}.png"))
        assert ours.shape == gt.shape
        r = ref[key] if ref[key].ndim == 2 else ref[key][..., 0]           # saved as RGB when ids are not 0..L-1
        want = np.array(Image.fromarray(r).resize(gt.shape[::-1], Image.NEAREST))
        same += int((ours == want).sum())
        total += ours.size
    assert total > 0 and same / total >= 0.99, f"{same}/{total} pixels equal"
    header, row = (out / "miou.csv").read_text().splitlines()
    assert header.split(",")[-1] == "miou" and len(row.split(",")) == 21
    hist, missing = vip_confusion(out, vip.parent / "Annotations" / "Category_ids")
    assert not missing and row.split(",")[-1] == f"{vip_iou(hist)[1]:.4f}"
    assert bench.entry(argv + ["--eval-only"]) == 0 and (out / "miou.csv").read_text().splitlines()[1] == row
    inside = vip.parent / "Images" / "videos" / "dance" / "results"       # never writes into its inputs
    assert bench.entry(argv[:3] + [str(inside)] + argv[4:]) == 2 and not inside.exists()


@pytest.mark.parametrize("run", ["jhmdb_a", "jhmdb_b"])
def test_pck_equals_eval_pck(run, ref, jhmdb):
    """jhmdb_pck on eval_pck.py's own pixel predictions gives its numbers exactly (every joint and the mean)."""
    dists = []
    for i, (_, mat) in enumerate(read_filelist(jhmdb)):
        pred = ref[f"{run}/pred_px{i}"].transpose(2, 1, 0)             # 2 x J x T -> T x J x 2
        dists.append(jhmdb_distances(pred, jhmdb_joints(mat)))
    pck = jhmdb_pck(dists, ALPHAS)
    for a, want in zip(ALPHAS, ref[f"{run}/pck"]):
        assert np.array_equal(pck[a], want), (a, pck[a], want)


@pytest.mark.parametrize("run", ["vip_a", "vip_b"])
def test_miou_equals_eval_vip(run, ref, vip, tmp_path):
    """vip_confusion/vip_iou on test.py's own label PNGs give eval_vip.py's histogram and mIoU exactly."""
    for key in (k for k in ref if k.startswith(f"{run}/pred/")):
        vid, frame = key.split("/")[2:]
        (tmp_path / vid).mkdir(exist_ok=True)
        Image.fromarray(ref[key]).save(tmp_path / vid / f"{frame}.png")
    hist, missing = vip_confusion(tmp_path, vip.parent / "Annotations" / "Category_ids")
    assert not missing
    assert np.array_equal(hist, ref[f"{run}/hist"])
    iu, miou = vip_iou(hist)
    assert np.array_equal(iu, ref[f"{run}/iu"], equal_nan=True) and miou == float(ref[f"{run}/miou"])


def test_jhmdb_benchmark_outputs_and_resume(ref, jhmdb, load_benchmark, tmp_path, golden_path, one_thread):
    """joints/<i>.npy (T x 15 x 2 pixels, within one cell of eval_pck.py's predictions), pck.csv scored from them,
    a second run reuses them, other settings are refused."""
    cfg = _cfg(ref, "jhmdb_a")
    bench = load_benchmark("jhmdb")
    out = tmp_path / "out"
    argv = ["--filelist", str(jhmdb), "--out", str(out), "--protocol", "crw", "--crop-size", str(cfg.crop_size),
            "--context", str(cfg.context), "--topk", str(cfg.topk), "--radius", str(cfg.radius), "--temperature",
            str(cfg.temperature), "--weights", str(golden_path), "--quiet"]
    assert bench.entry(argv) == 0
    videos = read_filelist(jhmdb)
    dists = []
    for i, (frames, mat) in enumerate(videos):
        joints = np.load(out / "joints" / f"{i}.npy")
        want = ref[f"jhmdb_a/pred_px{i}"].transpose(2, 1, 0)
        assert joints.shape == (len(jhmdb_frames(frames)), 15, 2) and joints.dtype == np.float32
        H, W = cv2.imread(str(jhmdb_frames(frames)[0])).shape[:2]
        cell = np.array([W, H]) / (cfg.crop_size / 8)
        assert (np.abs(joints - want) <= cell + 1e-4).all(-1).mean() >= 0.95
        dists.append(jhmdb_distances(joints, jhmdb_joints(mat)))
    rows = [r.split(",") for r in (out / "pck.csv").read_text().splitlines()]
    assert rows[0] == ["video", "pck@0.1", "pck@0.2", "pck@0.3", "pck@0.4", "pck@0.5"]
    assert [r[0] for r in rows[1:]] == ["dance/dance-twirl", "ride/bmx-trees", "mean"]
    pooled = jhmdb_pck(dists, ALPHAS)
    assert rows[-1][1:] == [f"{pooled[a][-1]:.4f}" for a in ALPHAS]
    stamp = (out / "joints" / "0.npy").stat().st_mtime_ns
    assert bench.entry(argv) == 0 and (out / "joints" / "0.npy").stat().st_mtime_ns == stamp
    assert bench.entry(argv[:-1] + ["--topk", "3", "--quiet"]) == 2
    (out / "pck.csv").unlink()
    assert bench.entry(argv + ["--eval-only", "--weights", "missing.pth"]) == 0       # no model needed
    assert [r.split(",") for r in (out / "pck.csv").read_text().splitlines()] == rows



def test_jhmdb_unreadable_joints_file_is_one_line(jhmdb, load_benchmark, tmp_path, golden_path, capsys, one_thread):
    """A joint_positions.mat that is not a MAT file: one line naming it, exit 2 (it was a scipy traceback)."""
    frames, _ = read_filelist(jhmdb)[0]
    bad = tmp_path / "joint_positions.mat"
    bad.write_text("garbage\n")
    (tmp_path / "list.txt").write_text(f"{frames} {bad}\n")
    with pytest.raises(DensevitError, match="cannot read pos_img"):
        jhmdb_joints(bad)
    argv = ["--filelist", str(tmp_path / "list.txt"), "--out", str(tmp_path / "out"), "--crop-size", "64",
            "--context", "3", "--weights", str(golden_path), "--device", "cpu", "--quiet"]
    assert load_benchmark("jhmdb").entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks/jhmdb.py: error:") and str(bad) in err[0]


def test_vip_unreadable_ground_truth_is_one_line(vip, load_benchmark, tmp_path, golden_path, capsys, one_thread):
    """A later frame's ground-truth PNG that is not an image: one line naming it, exit 2 (it was PIL's error)."""
    import shutil

    root = tmp_path / "VIP"
    shutil.copytree(vip.parent, root)
    (root / "VIP_list.txt").write_text(vip.read_text().replace(str(vip.parent), str(root)))
    bad = root / "Annotations" / "Category_ids" / "dance" / "000003.png"
    bad.write_text("junk\n")
    argv = ["--filelist", str(root / "VIP_list.txt"), "--out", str(tmp_path / "out"), "--crop-size", "64",
            "--context", "3", "--weights", str(golden_path), "--device", "cpu", "--quiet"]
    assert load_benchmark("vip").entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks/vip.py: error:") and str(bad) in err[0]

# ------------------------------------------------------------------------------------------- edges
def _brute_crw(feats, labels0, n, topk, temperature, radius, hw):
    """CRW's propagation written from test.py's index bank: the padded sequence (n copies of frame 0, then every
    frame), keys = padded frame 0 + the n padded frames before, the radius mask on the latter, joint top-k."""
    padded = [0] * n + list(range(len(feats)))
    lbl = [labels0] * (n + len(feats))
    bias = radius_bias(hw, radius)
    out = [labels0]
    for t in range(1, len(feats)):
        ctx = [0] + list(range(t, t + n))
        A = torch.cat([feats[padded[p]] @ feats[t].T + (bias if j else 0) for j, p in enumerate(ctx)]) / temperature
        w, idx = torch.topk(A, topk, dim=0)
        pred = (torch.cat([lbl[p] for p in ctx])[idx] * torch.softmax(w, 0)[..., None]).sum(0)
        lbl[n + t] = pred
        out.append(pred)
    return out


@pytest.mark.parametrize("n, topk, radius", [(0, 3, 2.0), (2, 4, 1.5), (5, 8, 3.0)])
def test_crw_context_bank(n, topk, radius):
    """The streaming engine equals the padded-sequence computation (copies of frame 0 in the context)."""
    g = torch.Generator().manual_seed(n)
    hw = (4, 5)
    feats = [torch.nn.functional.normalize(torch.randn(20, 6, generator=g), dim=1) for _ in range(6)]
    labels0 = torch.softmax(torch.randn(20, 3, generator=g), 1)
    cfg = CRWConfig(context=n, topk=topk, radius=radius, temperature=0.07)
    ours = list(crw_propagate(feats, labels0, hw, cfg))
    want = _brute_crw(feats, labels0, n, topk, 0.07, radius, hw)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b)


def test_crw_ties_of_repeated_frames():
    """A frame equal to frame 0: its own position appears 1 + context times in the context, so the top-k (all
    ties) take frame 0's labels exactly; without the copies (context 0) the top-k spreads over other cells."""
    g = torch.Generator().manual_seed(1)
    f0 = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    labels0 = torch.softmax(3 * torch.randn(30, 4, generator=g), 1)
    with_copies = list(crw_propagate([f0, f0.clone()], labels0, (5, 6), CRWConfig(context=9, topk=10, radius=4)))
    torch.testing.assert_close(with_copies[1], labels0)
    alone = list(crw_propagate([f0, f0.clone()], labels0, (5, 6), CRWConfig(context=0, topk=10, radius=4)))
    assert not torch.allclose(alone[1], labels0, atol=1e-3)


def test_radius_is_euclidean_and_strict():
    b = radius_bias((5, 5), 2.0)
    centre = b[12].reshape(5, 5)
    assert centre[2, 2] == 0 and centre[2, 3] == 0 and centre[3, 3] == 0       # distances 0, 1, 1.41
    assert centre[2, 4] == -1e10 and centre[3, 4] == -1e10                     # 2 (strict), 2.24


def test_joint_missing_from_frame_zero(ref, jhmdb):
    """A joint outside frame 0 has an empty map: -1 in every frame (as test.py), not counted by the scorer."""
    videos = read_filelist(jhmdb)
    gt = jhmdb_joints(videos[1][1])
    maps = pose_heatmaps(gt[:, :, 0].T, (90, 120), 96, 8)
    assert maps[..., 1 + 3].sum() == 0 and maps[..., 1:].sum() > 0
    assert (pose_readout(maps)[:, 3] == -1).all()
    for run in ("jhmdb_a", "jhmdb_b"):
        assert (ref[f"{run}/coords1"][:, 3, :] == -1).all()
    pred = ref["jhmdb_a/pred_px1"].transpose(2, 1, 0)
    assert len(jhmdb_distances(pred, gt)[3]) == 0


def test_gaussian_corners_truncate_towards_zero():
    """draw_labelmap_np's int(): a point at 0.6 starts its patch at column 0 (int(-0.9)), not -1 (floor)."""
    img = draw_gaussian(np.zeros((6, 6)), (0.6, 3.0))
    cols = np.nonzero(img.any(0))[0]
    assert cols.tolist() == [0, 1, 2]
    assert img[3, 0] == pytest.approx(np.exp(-((0 - 2) ** 2 + 0) / 0.5))      # g[.., 0]: the patch's own column 0
    assert np.allclose(draw_gaussian(np.zeros((6, 6)), (-3.0, 2.0)), 0)


def test_part_labels_resize_bilinearly():
    """VOSDataset's cv2.resize(lbl, size, cv2.INTER_NEAREST) puts the flag in dst: bilinear, so blended ids
    become channels of their own; a part of frame 0 alone (19) keeps its channel."""
    lbl = np.zeros((40, 40), np.uint8)
    lbl[:, 20:] = 4
    lbl[30:, :6] = 19
    onehot, ids = part_onehots(lbl, 64, 8)
    assert {0, 4, 19} <= set(ids.tolist()) and len(ids) > 3                 # plus blended boundary values
    assert onehot.shape == (8, 8, len(ids)) and torch.allclose(onehot.sum(-1), torch.ones(8, 8))
    back = part_readout(onehot, ids, 64, (40, 40))
    assert back.shape == (40, 40) and back[5, 5] == 0 and back[5, 35] == 4


def test_pck_rules():
    """eval_pck.py's rules: frame 0 not scored, a joint counted only where the prediction has it (x >= 0), which
    also decides the box, the threshold inclusive."""
    gt = np.zeros((2, 15, 3))
    gt[0, :, :] = np.arange(15)[:, None] * 2.0                     # joints on a line: x = 0..28, y = 0
    gt[1, 0, :] = 10.0                                             # joint 0 off the line: box 28 x 10 with it
    pred = gt.transpose(2, 1, 0).copy()
    pred[0] += 1000                                                # frame 0 wrong: not scored
    pred[1, 0, 0] = -1                                             # joint 0 missing in frame 1: box without it
    pred[1, 14, 0] += 0.6 * 26 * 0.19                              # joint 14 off by 0.19 of the box size
    d = jhmdb_distances(pred, gt)
    assert len(d[0]) == 1 and all(len(x) == 2 for x in d[1:])
    assert d[14][0] == pytest.approx(0.19)              # the box of frame 1 is 26 x 0 without joint 0
    pck = jhmdb_pck([d], (0.1, 0.2))
    assert pck[0.1][14] == 50 and pck[0.2][14] == 100 and pck[0.2][-1] == 100
    assert jhmdb_pck([[np.array([0.1])] * 15], (0.1,))[0.1][-1] == 100          # inclusive


def test_absent_part_scored_as_eval_vip(tmp_path):
    """A class predicted but absent from the ground truth has IoU 0; a class in neither is NaN and left out."""
    (tmp_path / "p" / "v").mkdir(parents=True)
    (tmp_path / "g" / "v").mkdir(parents=True)
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 2
    pred = gt.copy()
    pred[0, 0] = 19
    Image.fromarray(gt).save(tmp_path / "g" / "v" / "1.png")
    Image.fromarray(pred).save(tmp_path / "p" / "v" / "1.png")
    hist = vip_frame_hist(tmp_path / "p" / "v" / "1.png", tmp_path / "g" / "v" / "1.png")
    iu, miou = vip_iou(hist)
    assert iu[19] == 0 and np.isnan(iu[5]) and iu[0] == 1 and iu[2] == pytest.approx(7 / 8)
    assert miou == pytest.approx((1 + 7 / 8 + 0) / 3)


# ------------------------------------------------------------------------------------------- densevit-vos
@pytest.fixture(scope="module")
def static_clip(shared, tmp_path_factory):
    """Four identical 144x80 frames (a static camera)."""
    d = tmp_path_factory.mktemp("clip")
    rgb, _ = pdata.davis_clip(shared, "dance-twirl", 0, 1, (144, 80))[0]
    for t in range(4):
        Image.fromarray(rgb).save(d / f"{t:05d}.png")
    return d


@pytest.mark.parametrize("protocol, extra", [("crw", ["--crop-size", "64", "--context", "3"]),
                                             ("dino", ["--short-side", "80", "--multiple", "8"])])
def test_vos_tracks_points(protocol, extra, static_clip, tmp_path, golden_path, one_thread):
    """--first-points: points.json per frame and point; a static video keeps every point within one cell of
    where frame 0 reads it back; the GIF has one frame per video frame."""
    from densevit.apps.cli.vos import entry

    pts = tmp_path / "points.json"
    pts.write_text(json.dumps([{"x": 70, "y": 30, "name": "head"}, {"x": 72.5, "y": 50}, [60, 70]]))
    out, gif = tmp_path / "out", tmp_path / "tracks.gif"
    argv = ["--frames", str(static_clip), "--first-points", str(pts), "--out", str(out), "--gif", str(gif),
            "--protocol", protocol, "--weights", str(golden_path), "--quiet"] + extra
    assert entry(argv) == 0
    doc = json.loads((out / "points.json").read_text())
    assert doc["names"] == ["head", "1", "2"] and len(doc["frames"]) == 4
    first = np.array([[p["x"], p["y"]] for p in doc["frames"][0]["points"]])
    assert np.abs(first - [[70, 30], [72.5, 50], [60, 70]]).max() <= 144 / 8
    for fr in doc["frames"][1:]:
        xy = np.array([[p["x"], p["y"]] for p in fr["points"]])
        assert np.abs(xy - first).max() <= 144 / 8
    with Image.open(gif) as im:                      # repeated frames are merged, their durations added
        assert im.size == (144, 80)
        total = 0
        for i in range(im.n_frames):
            im.seek(i)
            total += im.info["duration"]
        assert total == 4 * 100


@pytest.mark.parametrize("content, message", [
    ([{"x": 500, "y": 10}], "outside the first frame"),
    ([], "holds no points"),
    ("{not json", "cannot read the points file"),
    ([{"x": "a", "y": 1}], "numeric x and y"),
])
def test_vos_points_errors(content, message, static_clip, tmp_path, capsys):
    from densevit.apps.cli.vos import entry

    pts = tmp_path / "p.json"
    pts.write_text(content if isinstance(content, str) else json.dumps(content))
    assert entry(["--frames", str(static_clip), "--first-points", str(pts), "--out", str(tmp_path / "o"),
                  "--weights", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_vos_crw_masks(static_clip, tmp_path, golden_path, one_thread):
    """densevit-vos --protocol crw on a mask: one mask per frame, at the frame size, ids of the first mask."""
    from densevit.apps.cli.vos import entry

    mask = np.zeros((80, 144), np.uint8)
    mask[20:60, 50:90] = 1
    mask[20:40, 50:70] = 2
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    assert entry(["--frames", str(static_clip), "--first-mask", str(tmp_path / "m.png"), "--out", str(out),
                  "--protocol", "crw", "--crop-size", "64", "--context", "2", "--weights", str(golden_path),
                  "--quiet"]) == 0
    masks = [np.array(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert len(masks) == 4 and all(m.shape == (80, 144) for m in masks)
    assert set(np.unique(masks[-1])) <= {0, 1, 2} and (masks[-1] == 2).any()


def test_vos_crw_refuses_a_finer_stride(static_clip, tmp_path, capsys):
    from densevit.apps.cli.vos import entry

    Image.fromarray(np.ones((80, 144), np.uint8)).save(tmp_path / "m.png")
    assert entry(["--frames", str(static_clip), "--first-mask", str(tmp_path / "m.png"), "--out",
                  str(tmp_path / "o"), "--protocol", "crw", "--crop-size", "64", "--stride", "4", "--weights",
                  "random", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leave out --stride" in err[0]


# ------------------------------------------------------------------------------------------- torchrun
def _torchrun(name, argv):
    """``torchrun --nproc_per_node 2 benchmarks/<name>.py ARGV`` (gloo on the CPU): the completed process."""
    import os
    import subprocess

    from densevit.io.paths import repo_root

    # --standalone: a local rendezvous on a free port, so parallel CI jobs never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo_root() / "benchmarks" / f"{name}.py"), *argv]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _stamps(files):
    return {p: p.stat().st_mtime_ns for p in files}


def test_jhmdb_benchmark_under_torchrun_equals_one_process(jhmdb, load_benchmark, tmp_path, golden_path,
                                                           one_thread):
    """Two gloo processes split the videos and rank 0 scores them all: joints bit-identical to one process's,
    the same pck.csv; a rerun keeps every result and redoes only a deleted one."""
    argv = ["--filelist", str(jhmdb), "--protocol", "crw", "--crop-size", "64", "--context", "3", "--topk", "5",
            "--radius", "5", "--temperature", "0.07", "--weights", str(golden_path), "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert load_benchmark("jhmdb").entry(argv + ["--out", str(one), "--quiet"]) == 0
    run = _torchrun("jhmdb", argv + ["--out", str(two), "--quiet"])
    assert run.stdout.count("pck@0.1") == 1                        # only rank 0 scores and prints
    videos = read_filelist(jhmdb)
    npys = sorted((two / "joints").glob("*.npy"))
    assert [p.name for p in npys] == [f"{i}.npy" for i in range(len(videos))]
    for p in npys:
        a, b = np.load(one / "joints" / p.name), np.load(p)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert (two / "pck.csv").read_text() == (one / "pck.csv").read_text()
    assert json.loads((two / "settings.json").read_text()) == json.loads((one / "settings.json").read_text())

    before = _stamps(npys)
    (two / "joints" / "1.npy").unlink()
    (two / "pck.csv").unlink()
    again = _torchrun("jhmdb", argv + ["--out", str(two)])          # with progress: it names what it computes
    names = [v[0].parent.name + "/" + v[0].name for v in videos]
    assert names[1] in again.stderr and names[0] not in again.stderr
    assert (two / "joints" / "0.npy").stat().st_mtime_ns == before[two / "joints" / "0.npy"]
    assert np.load(two / "joints" / "1.npy").tobytes() == np.load(one / "joints" / "1.npy").tobytes()
    assert (two / "pck.csv").read_text() == (one / "pck.csv").read_text()


def test_vip_benchmark_under_torchrun_equals_one_process(vip, load_benchmark, tmp_path, golden_path, one_thread):
    """Two gloo processes split the videos and rank 0 scores them all: the same part PNGs and miou.csv as one
    process; a rerun recomputes nothing."""
    argv = ["--filelist", str(vip), "--protocol", "crw", "--crop-size", "64", "--context", "3", "--topk", "5",
            "--radius", "3", "--temperature", "0.07", "--weights", str(golden_path), "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert load_benchmark("vip").entry(argv + ["--out", str(one), "--quiet"]) == 0
    run = _torchrun("vip", argv + ["--out", str(two), "--quiet"])
    assert run.stdout.count("miou") == 1                           # only rank 0 scores and prints
    pngs = sorted(two.glob("*/*.png"))
    assert [p.relative_to(two) for p in pngs] == [p.relative_to(one) for p in sorted(one.glob("*/*.png"))]
    names = [f.name for f, _ in read_filelist(vip)]
    assert {p.parent.name for p in pngs} == set(names) and len(pngs) == 10
    for p in pngs:
        np.testing.assert_array_equal(np.array(Image.open(p)), np.array(Image.open(one / p.relative_to(two))))
    assert (two / "miou.csv").read_text() == (one / "miou.csv").read_text()

    before = _stamps(pngs)
    (two / "miou.csv").unlink()
    again = _torchrun("vip", argv + ["--out", str(two)])           # with progress: it would name what it computes
    assert not any(f"] {n}" in again.stderr for n in names)
    assert _stamps(pngs) == before and sorted(two.glob("*/*.png")) == pngs
    assert (two / "miou.csv").read_text() == (one / "miou.csv").read_text()
