"""Warp pairs (exact geometry) and the warp benchmark end to end with the golden random weights."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.eval.datasets.warp import WarpConfig, WarpSource, default_sources, make_warp_pair, make_warp_pairs
from densevit.io.paths import golden_weights

W, H = 96, 72


def _ramp_source() -> WarpSource:
    """R and G encode the continuous x and y of each pixel centre; the object is a rectangle."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    arr = torch.stack([(xs + 0.5) / W, (ys + 0.5) / H, torch.full((H, W), 0.5)], -1)
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[10:60, 20:80] = True
    return WarpSource("ramp", "ramp", Image.fromarray((arr * 255 + 0.5).byte().numpy()), mask)


def _sample(img: Image.Image, xy: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None] / 255
    h, w = t.shape[-2:]
    g = torch.stack([xy[:, 0] / w * 2 - 1, xy[:, 1] / h * 2 - 1], 1).float()[None, None]
    return F.grid_sample(t, g, align_corners=False)[0, :, 0].T


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_warp_targets_are_exact(seed):
    src = _ramp_source()
    pair = make_warp_pair(src, seed, WarpConfig(photometric=False, num_points=25, flip_p=0.5))
    assert 0 < len(pair.src_kps) <= 25
    decoded = _sample(pair.trg_image, pair.trg_kps)[:, :2].double() * torch.tensor([W, H])
    err = (decoded - pair.src_kps).norm(dim=1)
    assert err.max() < 0.5, err                                       # 8-bit ramp + bilinear: ~0.2 px
    rows, cols = pair.src_kps[:, 1].long(), pair.src_kps[:, 0].long()
    assert src.mask[rows, cols].all()                                 # keypoints on the object
    x1, y1, x2, y2 = pair.trg_bbox
    assert ((pair.trg_kps[:, 0] >= x1 - 1) & (pair.trg_kps[:, 0] <= x2 + 1)
            & (pair.trg_kps[:, 1] >= y1 - 1) & (pair.trg_kps[:, 1] <= y2 + 1)).all()
    hom = torch.cat([pair.src_kps, torch.ones(len(pair.src_kps), 1, dtype=torch.float64)], 1) @ pair.homography.T
    assert torch.allclose(hom[:, :2] / hom[:, 2:], pair.trg_kps)        # the recorded continuous homography


def test_warp_pairs_are_deterministic_and_leave_the_rng_alone():
    src = _ramp_source()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = list(make_warp_pairs([src], 2, seed=7))
    after = torch.rand(1)
    b = list(make_warp_pairs([src], 2, seed=7))
    assert torch.equal(before, after)
    assert [p.name for p in a] == ["00000-ramp", "00001-ramp"]
    for p, q in zip(a, b):
        assert torch.equal(p.trg_kps, q.trg_kps) and p.flags == q.flags
        assert np.array_equal(np.asarray(p.trg_image), np.asarray(q.trg_image))
    assert not torch.equal(a[0].trg_kps, a[1].trg_kps)


def test_flip_flag():
    src = _ramp_source()
    cfg = WarpConfig(flip_p=1.0, degrees=0, scale=(1, 1), translate=0, perspective_p=0, crop_scale=(1, 1),
                     photometric=False)
    pair = make_warp_pair(src, 0, cfg)
    assert pair.flags["mirror"] == 1 and pair.flags["perspective"] == 0
    assert torch.allclose(pair.trg_kps[:, 0], W - pair.src_kps[:, 0]) and torch.allclose(pair.trg_kps[:, 1],
                                                                                          pair.src_kps[:, 1])


def test_default_sources():
    srcs = default_sources(max_side=64)
    names = [s.name for s in srcs]
    assert names[:2] == ["cat", "ibex"] and "blackswan_00000" in names
    assert all(max(s.image.size) == 64 for s in srcs)
    davis = [s for s in srcs if s.category.startswith("davis:")]
    assert davis and all(s.mask is not None and s.mask.shape == (s.image.height, s.image.width) for s in davis)


def test_warp_benchmark_end_to_end(tmp_path, capsys, monkeypatch, load_benchmark):
    bench = load_benchmark("warp")
    out = tmp_path / "run"
    base = ["--weights", str(golden_weights()), "--stride", "8", "--load-size", "64", "--image-size", "128",
            "--points", "8", "--device", "cpu", "--quiet"]
    entry = bench.run_cli(bench.main, "warp")
    assert entry(base + ["--layer", "9", "--out", str(out), "--pairs", "2"]) == 0
    assert entry(base + ["--layer", "9", "--out", str(out), "--pairs", "3"]) == 0    # resumes: only the third pair runs
    text = capsys.readouterr().out
    assert "1 pairs in" in text and "group" in text
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["00000-cat", "00001-ibex", "00002-blackswan_00000"]
    assert all(len(r["dist"]) == 8 and r["size_bbox"] > 0 for r in records)
    rows = {r["group"]: r for r in csv.DictReader(open(out / "pck.csv"))}
    assert {"cat", "ibex", "davis:blackswan", "all", "mean"} <= set(rows)
    assert any(g.startswith("mirror=") for g in rows) and any(g.startswith("rotation=") for g in rows)
    assert int(rows["all"]["n_pairs"]) == 3 and int(rows["all"]["n_points"]) == 24
    assert 0.0 <= float(rows["all"]["pck_point@0.1"]) <= 1.0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["stride"] == 8 and settings["summary"]["pairs"] == 3
    assert settings["summary"]["seconds_per_pair"] > 0 and "torch" in settings["run"]
    # other settings in the same folder: a one-line user error (exit 2), nothing overwritten
    assert entry(base + ["--layer", "11", "--out", str(out), "--pairs", "3"]) == 2
    assert "other settings" in capsys.readouterr().err

    # no warp at all: the same image on both sides must match almost perfectly (checks every coordinate step)
    ident = ["--flip-p", "0", "--degrees", "0", "--scale", "1", "1", "--translate", "0", "--perspective", "0",
             "--crop-scale", "1", "1", "--no-photometric", "--alphas", "0.1", "--threshold", "image"]
    assert entry(base + ["--out", str(tmp_path / "ident"), "--pairs", "1"] + ident) == 0
    rows = {r["group"]: r for r in csv.DictReader(open(tmp_path / "ident" / "pck.csv"))}
    assert float(rows["all"]["pck_point@0.1"]) >= 0.9
