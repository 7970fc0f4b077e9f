"""GeoAware-SC's zero-shot SPair-71k protocol (``benchmarks/spair.py --protocol geoaware``) against its reference
code, and its matching steps at the edges.

How ``fixtures/geoaware/`` was made (scripts outside the repository; the fetched code is not shipped):
github Junyi42/GeoAware-SC at commit 99fd6b6. A small SPair-71k tree was built from ``../shared/data/images``:
category ``cat`` = cat.jpg shrunk to 320 x 240 (``cat_a``), its horizontal mirror (``cat_f``, keypoint ids swapped
by the cat flip table) and a crop stretched to a 240 x 300 portrait (``cat_w``); category ``sheep`` = ibex.jpg
shrunk to 312 x 320 (``ibex_a``) and its mirror (``ibex_f``); hand-placed keypoints, image annotations with the
release's 30 ids; pairs cat_a->cat_f, cat_a->cat_w, cat_w->cat_f, ibex_a->ibex_f; object masks (the box, drawn on
the 840 px canvas, and on the mirrored image's canvas) in the reference's ``features/<cat>/<img>_mask[_flip].png``.
DINOv2 ViT-B/14 weights: the official model (facebookresearch/dinov2 b8931f7, the hub's ``dinov2_vitb14``
arguments) with the official-layout random state dict of ``tests/official_random.py``, seed 34 (key shapes in
``expected.json``). The reference's pre-extraction (``preprocess_map.py``'s DINO part: ``resize`` to 840,
``ViTExtractor('dinov2_vitb14', 14)``, layer 11, ``token``) wrote the descriptors, the Stable Diffusion parts
were zero tensors (so ``normalize_feats`` of ``DUMMY_NET`` leaves the L2-normalised DINO part: DINO-only), and
``pck_train.compute_pck`` ran with ``configs/eval_zero_shot_spair.yaml`` (DUMMY_NET, ADAPT_FLIP, SOFT_EVAL,
SOFT_EVAL_WINDOW 5, COMPUTE_GEOAWARE_METRICS, TEST_SAMPLE 0; ANNO_SIZE 840), once with MUTUAL_NN (both
categories) and once with the mask distance (both categories), on CPU; only device calls (``.cuda()``, the
``device='cuda'`` default) and missing imports (wandb, loguru, pandas, the SD extractor) were patched. Recorded: per
pair the predicted keypoints (``src_kpts_pred``), both distances (hence the flip decision), the per-image PCK and
the geo-aware per-image PCK (``eval_spair.get_img_result``), per category ``img_correct``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densevit.errors import DensevitError
from densevit.eval.geoaware import (GeoAwareImage, GeoAwareSettings, evaluate_geoaware, geo_aware_ids,
                                    summarize_geoaware, used_ids)
from densevit.io.letterbox import letterbox, letterbox_geometry
from densevit.matching.geoaware import (choose_orientation, compact_table, flip_permutation, flip_points,
                                        mask_distance, mutual_nn_distance, points_to_tokens, transfer_canvas_points,
                                        window_soft_argmax)

from official_random import official_state_dict

FIX = Path(__file__).parent / "fixtures" / "geoaware"
ROOT = FIX / "spair"


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIX / "expected.json").read_text())


@pytest.fixture(scope="module")
def weights(tmp_path_factory, expected):
    path = tmp_path_factory.mktemp("w") / "dinov2_vitb14_pretrain.pth"
    torch.save(official_state_dict(expected["shapes"], expected["weights_seed"]), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights):
    """The benchmark on the fixture: --protocol geoaware (masks from the tree), then flip-mutual-nn from the
    same descriptor cache."""
    import importlib.util

    from densevit.io.paths import repo_root

    spec = importlib.util.spec_from_file_location("bench_spair_geo", repo_root() / "benchmarks" / "spair.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for mode, extra in (("flip-mask", []), ("flip-mutual-nn", ["--pose-align", "flip-mutual-nn"])):
        d = base / mode
        assert bench.main(["--root", str(ROOT), "--split", "test", "--protocol", "geoaware", "--weights",
                           str(weights), "--cache", str(base / "cache"), "--out", str(d), "--quiet"] + extra) == 0
        out[mode] = d
    return out


def _records(d: Path):
    return {r["name"]: r for r in map(json.loads, (d / "records.jsonl").read_text().splitlines())}


def _canvas(name: str, pred):
    """densevit's target-pixel predictions -> the reference's 840 px canvas."""
    cat = name.rsplit(":", 1)[1]
    trg = name.split(":")[0].split("-")[2]
    ann = json.loads((ROOT / "ImageAnnotation" / cat / f"{trg}.json").read_text())
    return letterbox_geometry((ann["image_width"], ann["image_height"]), 840).to_canvas(torch.tensor(pred))


# the modes the reference was run in (expected.json); both are there
MODES = [m for m in ("flip-mask", "flip-mutual-nn") if m in json.loads((FIX / "expected.json").read_text())]


def test_both_modes_have_reference_outputs():
    assert MODES == ["flip-mask", "flip-mutual-nn"]


@pytest.mark.parametrize("mode", MODES)
def test_benchmark_equals_reference(runs, expected, mode):
    """Every pair the reference ran in this mode (mutual NN: all five; mask distance: the sheep pair, the reference's
    per-cell loop being slow): flip decision, keypoints (0.5 px at 840), per-image and geo-aware PCK; per category
    and overall ``pck_img`` as ``img_correct`` and its pair-weighted mean."""
    exp = expected[mode]
    recs = _records(runs[mode])
    assert set(exp["pairs"]) <= set(recs)
    close = total = 0
    flips = []
    for name, ref in exp["pairs"].items():
        r = recs[name]
        pair = json.loads((ROOT / "PairAnnotation" / "test" / f"{name}.json").read_text())
        ids = [int(k) for k in pair["kps_ids"]]
        err = (_canvas(name, r["pred_kps"]) - torch.tensor(ref["pred_kps"])[ids]).norm(dim=1)
        close += int((err <= 0.5).sum())
        total += len(ids)
        assert r["flipped"] == ref["flipped"], name
        flips.append(ref["flipped"])
        assert r["pck_img"] == pytest.approx(ref["pck_img"], abs=1e-6), name
        if ref["pck_img_geo"] is None:
            assert r["pck_img_geo"] is None
        else:
            assert r["pck_img_geo"] == pytest.approx(ref["pck_img_geo"], abs=1e-6), name
    assert close >= 0.99 * total, f"{close}/{total} keypoints within 0.5 px"
    assert any(flips)                                   # the flip branch is exercised
    rows = {row["group"]: row for row in csv.DictReader(open(runs[mode] / "pck.csv"))}
    for cat, ref in exp["categories"].items():
        got = [float(rows[cat][f"pck_img@{a}"]) for a in ("0.1", "0.05", "0.01")]
        assert got == pytest.approx(ref["pck_img"], abs=1e-5)
    if set(exp["pairs"]) == set(recs):
        assert not all(flips)                           # and the original kept
        n = sum(c["n_pairs"] for c in exp["categories"].values())
        overall = [sum(c["pck_img"][i] * c["n_pairs"] for c in exp["categories"].values()) / n for i in range(3)]
        assert [float(rows["all"][f"pck_img@{a}"]) for a in ("0.1", "0.05", "0.01")] == pytest.approx(overall,
                                                                                                     abs=1e-5)
        geo = [p["pck_img_geo"][0] for p in exp["pairs"].values() if p["pck_img_geo"] is not None]
        assert float(rows["all"]["pck_img_geo@0.1"]) == pytest.approx(sum(geo) / len(geo), abs=1e-5)
        assert float(rows["all"]["pck_img_geo@0.1"]) == pytest.approx(exp["all"]["pck_img_geo"][0], abs=1e-5)


def test_benchmark_outputs_and_settings(runs):
    d = runs["flip-mask"]
    settings = json.loads((d / "settings.json").read_text())
    assert settings["settings"]["protocol"] == "geoaware"
    assert settings["settings"]["masks_used"].startswith("files in")
    g = settings["settings"]["geoaware"]
    assert (g["refine"], g["window"], g["anno_size"], g["load_size"], g["layer"], g["facet"]) == \
        ("window-softargmax", 5, 840, 840, 11, "token")
    header = next(csv.reader(open(d / "pck.csv")))
    assert header[-4:] == ["pck_img@0.1", "pck_img@0.05", "pck_img@0.01", "pck_img_geo@0.1"]
    for r in _records(d).values():
        assert len(r["pred_kps"]) == len(r["dist"]) and isinstance(r["flipped"], bool)
    assert "GeoAware-SC per-image PCK" in (d / "pck.txt").read_text()


def test_letterbox_is_the_reference_resize():
    from PIL import Image

    img = Image.open(ROOT / "JPEGImages" / "cat" / "cat_w.jpg")         # 240 x 300 portrait
    canvas, geo = letterbox(img, 840)
    assert geo.resized_wh == (672, 840) and geo.offset == (84, 0) and canvas.size == (840, 840)
    px = torch.tensor([[0.0, 0.0], [239.0, 299.0]])
    assert geo.to_canvas(px).tolist() == [[84.0, 0.0], [pytest.approx(84 + 239 * 2.8, abs=1e-3), pytest.approx(837.2, abs=1e-3)]]
    assert torch.allclose(geo.to_image(geo.to_canvas(px)), px.double(), atol=1e-3)


# ---- the steps at their edges (small synthetic inputs) ---------------------------------------------------------

def _loop_window_soft_argmax(sims, n, window, beta=0.02):
    out = []
    for row in sims:
        j = int(row.argmax())
        r0, c0 = j // n, j % n
        mask = torch.zeros(n, n)
        for dr in range(-window, window + 1):
            for dc in range(-window, window + 1):
                mask[min(max(r0 + dr, 0), n - 1), min(max(c0 + dc, 0), n - 1)] = 1
        s = row.view(n, n) * mask if window else row.view(n, n)
        p = torch.exp((s - s.max()) / beta)
        p = p / p.sum()
        lin = torch.linspace(-1, 1, n)
        x, y = float((p.sum(0) * lin).sum()), float((p.sum(1) * lin).sum())
        out.append([(x + 1) * (n - 1) / 2, (y + 1) * (n - 1) / 2])
    return torch.tensor(out)


@pytest.mark.parametrize("window", [0, 1, 3])
def test_window_soft_argmax_at_the_border(window):
    n = 7
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(5, n * n, generator=g) * 0.1
    for i, cell in enumerate([0, n - 1, n * n - 1, n * (n - 1), 3 * n + 3]):   # corners (window clamped) and centre
        sims[i, cell] = 1.0
    got = window_soft_argmax(sims, n, window)
    assert torch.allclose(got, _loop_window_soft_argmax(sims, n, window), atol=1e-4)
    assert (got >= 0).all() and (got <= n - 1).all()
    # a peak in the corner pulls the soft-argmax to it; the window keeps far cells at weight exp(-max/beta)
    assert got[0].tolist() == pytest.approx([0, 0], abs=0.05 if window else 0.5)


def test_window_soft_argmax_rejects_negative_window():
    with pytest.raises(DensevitError):
        window_soft_argmax(torch.zeros(1, 4), 2, -1)


def test_points_to_tokens_edge_of_canvas():
    # a flipped x = 0 lands on x = anno: column n, i.e. the next row's first token, as the reference computes it;
    # past the last token it is clamped (the reference would fail)
    assert points_to_tokens(torch.tensor([[840.0, 0.0], [0.0, 0.0], [839.0, 839.0], [840.0, 839.0]]), 840,
                            60).tolist() == [60, 0, 3599, 3599]


def test_flip_permutation_groups_and_visibility():
    table = [[0, 1], 2, [3, 4, 5]]
    assert flip_permutation(table, 7).tolist() == [1, 0, 2, 4, 5, 3, 6]
    vis = torch.tensor([True, False, True, True, True, True, True])
    assert flip_permutation(table, 7, vis).tolist() == [0, 1, 2, 4, 5, 3, 6]
    pts = torch.tensor([[10.0, 1.0], [20.0, 2.0]])
    assert flip_points(pts, 840, torch.tensor([1, 0])).tolist() == [[820.0, 2.0], [830.0, 1.0]]


def test_compact_table_as_the_reference_renumbers():
    table = [[0, 2], [4, 6], 1, 5, [3, 7]]          # tvmonitor-like order
    assert compact_table(table, list(range(8))) == [[0, 2], [4, 6], [1], [5], [3, 7]]
    # id 4 never visible: groups keep their used ids, renumbered in table order
    assert compact_table(table, [0, 1, 2, 3, 5, 6, 7]) == [[0, 1], [2], [3], [4], [5, 6]]


def test_choose_orientation_needs_the_twin_visible():
    pred, pred_f = torch.zeros(4, 2), torch.ones(4, 2)
    vis = torch.tensor([True, False, True, True])
    perm = flip_permutation([[0, 1], [2, 3]], 4)
    out, flipped = choose_orientation(pred, pred_f, vis, perm, 0.5, 1.0)
    assert flipped and out[:, 0].tolist() == [0, 0, 1, 1]
    out, flipped = choose_orientation(pred, pred_f, vis, perm, 1.0, 1.0)     # a tie keeps the original
    assert not flipped and out.sum() == 0


def _loop_mask_distance(a, b, ma, mb, n, res):
    fa = torch.nn.functional.interpolate(a.T.reshape(1, -1, n, n), size=(res, res), mode="bilinear")[0]
    fb = torch.nn.functional.interpolate(b.T.reshape(1, -1, n, n), size=(res, res), mode="bilinear")[0]
    ra = torch.nn.functional.interpolate(ma[None, None], size=(res, res), mode="nearest")[0, 0]
    rb = torch.nn.functional.interpolate(mb[None, None], size=(res, res), mode="nearest")[0, 0]
    fa, fb = fa * ra, fb * rb
    fa[fa == 0] = -100000
    fb[fb == 0] = -100000
    fa, fb = fa.reshape(fa.shape[0], -1).T, fb.reshape(fb.shape[0], -1).T
    d = [float(torch.linalg.norm(fb - fa[i], dim=1).min()) for i in range(res * res) if ra.reshape(-1)[i] == 1]
    return sum(d) / len(d)


def test_mask_distance_equals_the_loop():
    g = torch.Generator().manual_seed(1)
    n, res = 6, 8
    a = torch.nn.functional.normalize(torch.randn(n * n, 16, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n * n, 16, generator=g), dim=1)
    ma = torch.zeros(20, 20)
    ma[3:15, 2:12] = 1
    mb = torch.zeros(20, 20)
    mb[5:19, 6:18] = 1
    assert mask_distance(a, b, ma, mb, resolution=res, chunk=7) == pytest.approx(
        _loop_mask_distance(a, b, ma, mb, n, res), rel=1e-5)


def test_mutual_nn_distance_equals_the_loop():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    d = torch.cdist(a, b)
    n12, n21 = d.argmin(1), d.argmin(0)
    keep = [i for i in range(30) if n21[n12[i]] == i]
    assert mutual_nn_distance(a, b) == pytest.approx(float(d.min(1).values[keep].mean()), rel=1e-6)


class _FixedDescriber:
    """Descriptors of a synthetic 4 x 4 grid (one-hot positions), mirrored for the flipped view."""

    def __init__(self):
        n = 4
        eye = torch.eye(n * n)
        self.maps = {False: eye, True: eye.view(n, n, -1).flip(1).reshape(n * n, -1)}

    def __call__(self, key, load, flipped=False):
        return self.maps[flipped], None


def _img(key, kps, category="nocategory"):
    return GeoAwareImage(key, lambda: None, category, torch.tensor(kps, dtype=torch.float64), (56, 56), key)


def test_category_without_flip_table_and_no_visible_keypoint():
    s = GeoAwareSettings(pose_align="flip-mutual-nn", anno_size=56, load_size=56)
    src = _img("a", [[7.0, 7.0], [49.0, 21.0], [float("nan")] * 2])
    trg = _img("b", [[7.0, 7.0], [49.0, 21.0], [21.0, 21.0]])
    res = evaluate_geoaware(_FixedDescriber(), src, trg, [0, 1, 2], (0, 0, 56, 56), s)
    assert res.pck_img_geo is None and res.n_geo == 0              # no table: no geometry-aware subset
    assert res.pck_img is not None and res.pck_img[0] == 1.0
    assert res.flipped is False                                    # identical maps: the original wins the tie
    none = _img("c", [[float("nan")] * 2] * 3)
    res = evaluate_geoaware(_FixedDescriber(), none, trg, [0, 1, 2], (0, 0, 56, 56), s)
    assert res.pck_img is None and res.pck_img_geo is None          # no mutually visible keypoint: no score
    table = summarize_geoaware([{"category": "x", "pck_img": None, "pck_img_geo": None, "flipped": False},
                                {"category": "x", "pck_img": [1.0, 0.5, 0.0], "pck_img_geo": None, "flipped": True}])
    assert table["all"]["pck_img@0.1"] == 1.0                       # the pair without points is left out


def test_geo_aware_ids_rule():
    vis = torch.zeros(30, dtype=torch.bool)
    vis_t = torch.zeros(30, dtype=torch.bool)
    vis[[2, 9]] = True                   # cat: ears [2, 3], paws [9, 10, 11, 12]
    vis_t[[2, 3, 9]] = True
    assert geo_aware_ids("cat", vis, vis_t) == [2]                 # paws: only one visible in the target
    assert geo_aware_ids("unknown", vis, vis_t) == []
    assert used_ids([torch.tensor([[1.0, 1.0], [float("nan")] * 2]), torch.tensor([[float("nan")] * 2] * 3)]) == [0]


def test_flip_mask_needs_masks():
    with pytest.raises(DensevitError, match="masks"):
        GeoAwareSettings(pose_align="flip-mask", masks="file", masks_dir=None).check()
    with pytest.raises(DensevitError):
        GeoAwareSettings(pose_align="sideways").check()


def test_transfer_without_refinement_gives_token_centres():
    n = 4
    eye = torch.eye(n * n)
    out = transfer_canvas_points(eye, eye, torch.tensor([[15.0, 29.0]]), 56, refine="none")
    assert out.tolist() == [[21.0, 35.0]]                          # token (2, 1): centre 14 * 1 + 7, 14 * 2 + 7


def test_match_points_with_pose_alignment(tmp_path, capsys):
    """densevit-match --points with GeoAware's steps (a small backbone and canvas: the code path, not the figures)."""
    from PIL import Image

    from densevit.apps.cli import match as cli_match

    a, b = ROOT / "JPEGImages" / "cat" / "cat_a.jpg", ROOT / "JPEGImages" / "cat" / "cat_f.jpg"
    pts = tmp_path / "pts.json"
    pts.write_text(json.dumps([[222, 62], [252, 58], [217, 50], [257, 42]]))
    common = ["--backbone", "dinov2_vits14", "--weights", "random", "--layer", "11", "--facet", "token", "--no-bin",
              "--load-size", "112", "--num-pairs", "2", "--points", str(pts), "--anno-size", "224"]
    out = tmp_path / "m"
    assert cli_match.entry([str(a), str(b), "--out", str(out), "--pose-align", "flip-mutual-nn", "--refine",
                            "window-softargmax", "--window", "2", "--flip-table", "cat"] + common) == 0
    assert "pose alignment kept the" in capsys.readouterr().out
    tr = json.loads((out / "cat_a_cat_f_transfer.json").read_text())
    assert tr["flipped"] == (tr["flip_dist"] < tr["original_dist"])
    pb = np.array(tr["points_b"])
    assert pb.shape == (4, 2) and (pb >= 0).all() and (pb[:, 0] < 320).all() and (pb[:, 1] < 240).all()
    pic = Image.open(out / "cat_a_cat_f_transfer.png")
    assert pic.mode == "RGB" and pic.size[1] == 512 + 28          # the caption band on top
    out2 = tmp_path / "m2"
    assert cli_match.entry([str(a), str(b), "--out", str(out2), "--pose-align", "flip-mask", "--masks", "saliency"]
                           + common) == 0
    assert json.loads((out2 / "cat_a_cat_f_transfer.json").read_text())["masks"] == "saliency"
    assert cli_match.entry([str(a), str(b), "--out", str(tmp_path / "m3"), "--pose-align", "flip-mask"]
                           + common) != 0
    assert "needs --masks" in capsys.readouterr().err
