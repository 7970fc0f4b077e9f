"""SPair-71k reader on a small fixture in the official layout, and benchmarks/spair.py end to end.

The fixture is built from real shared images: each "category" has a source image and a warped copy of it
(densevit.eval.datasets.warp), so the keypoints of the target are placed by a known transform. Annotations are
written in exactly the released JSON format (key order, types, separators, final newline), checked against the
reference files in ../shared/data/spair-format.
"""
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from densevit.errors import DensevitError
from densevit.eval.datasets.spair import (
    PAIR_FLAGS,
    SPair,
    image_json,
    pair_json,
    parse_image,
    parse_pair,
    parse_pair_name,
    write_annotation,
)
from densevit.eval.datasets.warp import WarpConfig, default_sources, make_warp_pair
from densevit.io.paths import golden_weights, shared_dir

FORMAT_DIR = shared_dir() / "data" / "spair-format"
REF_PAIR = FORMAT_DIR / "000001-2008_002719-2008_004100:aeroplane.json"
REF_IMAGE = FORMAT_DIR / "2008_002719.json"
K = 6  # keypoint ids per category in the fixture


def _grid_points(bbox, n=K):
    """``n`` integer points spread inside a box (deterministic)."""
    x1, y1, x2, y2 = bbox
    fx = torch.tensor([0.2, 0.5, 0.8, 0.3, 0.7, 0.5])[:n]
    fy = torch.tensor([0.25, 0.2, 0.3, 0.75, 0.7, 0.5])[:n]
    return torch.stack([x1 + fx * (x2 - x1), y1 + fy * (y2 - y1)], 1).round()


def build_fixture(root: Path) -> dict:
    """Write a tiny SPair tree; returns what was written: {split: [(name, pair dict)]}, images."""
    srcs = {s.name: s for s in default_sources(max_side=160)}
    spec = [("cat", "cat", 0), ("dog_00000", "dog", 1), ("blackswan_00000", "bird", 2)]
    cfg = WarpConfig(photometric=True, degrees=15, perspective=0.15)
    written = {"test": [], "trn": [], "H": {}}
    pair_id = 0
    for k, (src_name, category, seed) in enumerate(spec):
        src = srcs[src_name]
        wp = make_warp_pair(src, seed, cfg)
        written["H"][category] = wp.homography
        names = [f"2010_{k * 2 + 1:06d}", f"2010_{k * 2 + 2:06d}"]
        for name, img in zip(names, (wp.src_image, wp.trg_image)):
            (root / "JPEGImages" / category).mkdir(parents=True, exist_ok=True)
            img.save(root / "JPEGImages" / category / f"{name}.jpg", quality=95)
        # integer source keypoints on the object, exact targets through the warp (rounded as the release)
        src_kps = _grid_points(wp.src_bbox)
        trg_f = _map(wp.homography, src_kps)
        th, tw = wp.trg_hw
        trg_vis = (trg_f[:, 0] >= 0) & (trg_f[:, 0] < tw) & (trg_f[:, 1] >= 0) & (trg_f[:, 1] < th)
        trg_kps = trg_f.round()
        src_vis = torch.ones(K, dtype=torch.bool)
        src_vis[K - 1] = False                                  # one keypoint invisible in the source
        kps_img = [[None if not v else p.long().tolist() for p, v in zip(kps, vis)]
                   for kps, vis in ((src_kps, src_vis), (trg_kps, trg_vis))]
        boxes = [[int(round(v)) for v in wp.src_bbox], [int(round(v)) for v in wp.trg_bbox]]
        hws = [wp.src_hw, wp.trg_hw]
        for i, name in enumerate(names):
            write_annotation(root / "ImageAnnotation" / category / f"{name}.json",
                             image_json(f"{name}.jpg", category, hws[i], boxes[i], kps_img[i], pose="Left",
                                        truncated=i, occluded=0, difficult=0, azimuth_id=k))
        both = [j for j in range(K) if src_vis[j] and trg_vis[j]]
        for direction, split in ((0, "test"), (1, "test"), (0, "trn")):
            a, b = (0, 1) if direction == 0 else (1, 0)
            pair_id += 1
            kps = (src_kps, trg_kps)
            d = pair_json(pair_id, f"{names[a]}.jpg", f"{names[b]}.jpg", category,
                          [hws[a][1], hws[a][0], 3], [hws[b][1], hws[b][0], 3], boxes[a], boxes[b],
                          kps[a][both].long().tolist(), kps[b][both].long().tolist(), [str(j) for j in both],
                          src_pose="Left", trg_pose="Right" if wp.flags["mirror"] else "Left",
                          mirror=wp.flags["mirror"], viewpoint_variation=wp.flags["rotation"],
                          scale_variation=wp.flags["scale_variation"], truncation=(pair_id % 4),
                          occlusion=(pair_id * 3) % 4)
            write_annotation(root / "PairAnnotation" / split / f"{d['filename']}.json", d)
            written[split].append((d["filename"], d))
    for split in ("test", "trn"):
        for size in ("large", "small"):
            (root / "Layout" / size).mkdir(parents=True, exist_ok=True)
            (root / "Layout" / size / f"{split}.txt").write_text("".join(n + "\n" for n, _ in written[split]))
    (root / "PairAnnotation" / "val").mkdir(parents=True, exist_ok=True)
    return written


def _map(h: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Points ``Nx2`` through a 3x3 homography (continuous pixel coordinates)."""
    p = torch.cat([xy.double(), torch.ones(len(xy), 1, dtype=torch.float64)], 1) @ h.T
    return p[:, :2] / p[:, 2:]


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("SPair-71k")
    return root, build_fixture(root)


def test_reference_files_parse_exactly():
    raw = json.loads(REF_PAIR.read_text())
    p = parse_pair(raw, REF_PAIR.stem, "test")
    assert p.name == "000001-2008_002719-2008_004100:aeroplane" and p.pair_id == 1 and p.category == "aeroplane"
    assert p.src_imname == "2008_002719.jpg" and p.trg_imname == "2008_004100.jpg"
    assert p.src_hw == (333, 500) and p.trg_hw == (332, 500)             # imsize is [width, height, depth]
    assert p.src_bndbox == (210, 34, 475, 250) and p.trg_bndbox == (36, 92, 500, 200)
    assert p.src_kps.tolist() == [[212, 153], [300, 130], [330, 127]]
    assert p.trg_kps.tolist() == [[39, 145], [364, 171], [416, 173]]
    assert p.kps_ids == ("0", "7", "11") and (p.src_pose, p.trg_pose) == ("Left", "Left")
    assert p.flags == {"mirror": 0, "viewpoint_variation": 0, "scale_variation": 0, "truncation": 2, "occlusion": 2}
    assert parse_pair_name(p.name) == (1, "2008_002719", "2008_004100", "aeroplane")
    img = parse_image(json.loads(REF_IMAGE.read_text()))
    assert img.hw == (333, 500) and img.bndbox == (210, 34, 475, 250) and img.azimuth_id == 2
    assert img.kps.shape == (30, 2) and img.kps[7].tolist() == [300, 130] and torch.isnan(img.kps[1]).all()
    assert int(torch.isfinite(img.kps[:, 0]).sum()) == 20
    # the pair's keypoints are the image's keypoints of its ids
    assert torch.equal(img.kps[[int(k) for k in p.kps_ids]], p.src_kps)


def test_writers_reproduce_the_release_bytes(tmp_path):
    raw = json.loads(REF_PAIR.read_text())
    d = pair_json(raw["pair_id"], raw["src_imname"], raw["trg_imname"], raw["category"], raw["src_imsize"],
                  raw["trg_imsize"], raw["src_bndbox"], raw["trg_bndbox"], raw["src_kps"], raw["trg_kps"],
                  raw["kps_ids"], raw["src_pose"], raw["trg_pose"],
                  **{k: raw[k] for k in PAIR_FLAGS})
    write_annotation(tmp_path / "p.json", d)
    assert (tmp_path / "p.json").read_bytes() == REF_PAIR.read_bytes()
    ri = json.loads(REF_IMAGE.read_text())
    di = image_json(ri["filename"], ri["category"], (ri["image_height"], ri["image_width"]), ri["bndbox"],
                    list(ri["kps"].values()), ri["pose"], ri["truncated"], ri["occluded"], ri["difficult"],
                    ri["azimuth_id"], ri["src_database"], ri["src_annotation"], ri["src_image"])
    write_annotation(tmp_path / "i.json", di)
    assert (tmp_path / "i.json").read_bytes() == REF_IMAGE.read_bytes()


def test_fixture_matches_official_format(spair_root):
    root, written = spair_root
    ref_pair, ref_img = json.loads(REF_PAIR.read_text()), json.loads(REF_IMAGE.read_text())
    for name, _ in written["test"]:
        d = json.loads((root / "PairAnnotation" / "test" / f"{name}.json").read_text())
        assert list(d) == list(ref_pair)
        assert {k: type(v) for k, v in d.items()} == {k: type(v) for k, v in ref_pair.items()}
    for f in (root / "ImageAnnotation").rglob("*.json"):
        d = json.loads(f.read_text())
        assert list(d) == list(ref_img) and {k: type(v) for k, v in d.items()} == {
            k: type(v) for k, v in ref_img.items()}


def test_reader_parses_fixture_exactly(spair_root):
    root, written = spair_root
    ds = SPair(root, "test")
    assert ds.names == [n for n, _ in written["test"]] and len(ds) == 6
    for pair, (name, d) in zip(ds, written["test"]):
        assert pair.name == name and pair.split == "test" and pair.raw == d
        assert pair.pair_id == d["pair_id"] and pair.category == d["category"]
        assert (pair.src_imname, pair.trg_imname) == (d["src_imname"], d["trg_imname"])
        assert pair.src_hw == (d["src_imsize"][1], d["src_imsize"][0])
        assert pair.trg_hw == (d["trg_imsize"][1], d["trg_imsize"][0])
        assert list(pair.src_bndbox) == d["src_bndbox"] and list(pair.trg_bndbox) == d["trg_bndbox"]
        assert pair.src_kps.tolist() == d["src_kps"] and pair.trg_kps.tolist() == d["trg_kps"]
        assert list(pair.kps_ids) == d["kps_ids"] and pair.num_points == len(d["kps_ids"])
        assert pair.flags == {k: d[k] for k in PAIR_FLAGS}
        with Image.open(ds.image_path(pair.category, pair.trg_imname)) as im:
            assert (im.height, im.width) == pair.trg_hw
        img = ds.image_annotation(pair.category, pair.src_imname)
        ids = [int(k) for k in pair.kps_ids]
        assert torch.equal(img.kps[ids], pair.src_kps) and img.hw == pair.src_hw
        if int(pair.src_imname[5:11]) % 2:                              # the unwarped image of the category
            assert torch.isnan(img.kps[K - 1]).all() and str(K - 1) not in pair.kps_ids
            # the target keypoints are where the warp puts the source keypoints (rounded to pixels as released)
            err = (_map(written["H"][pair.category], pair.src_kps) - pair.trg_kps).norm(dim=1)
            assert pair.num_points >= 3 and err.max() <= 0.5 ** 0.5 + 1e-9


def test_reader_selection_and_errors(spair_root, tmp_path):
    root, written = spair_root
    assert SPair(root, "train").names == [n for n, _ in written["trn"]]          # alias of "trn"
    assert [p.category for p in SPair(root, "test", categories=["dog"])] == ["dog", "dog"]
    assert len(SPair(root, "test", categories=["bird", "cat"], limit=3)) == 3
    assert SPair(root, "test", layout="none").names == sorted(n for n, _ in written["test"])  # no layout: sorted
    with pytest.raises(DensevitError, match="horse"):
        SPair(root, "test", categories=["horse"])
    with pytest.raises(DensevitError, match="split"):
        SPair(root, "testing")
    with pytest.raises(DensevitError, match="not an SPair-71k tree"):
        SPair(tmp_path, "test")
    with pytest.raises(DensevitError, match="no SPair pairs"):
        SPair(root, "val", layout="none")
    with pytest.raises(DensevitError, match="malformed"):
        parse_pair({"pair_id": 1}, "x", "test")


def test_spair_benchmark_end_to_end(spair_root, tmp_path, capsys, monkeypatch, load_benchmark):
    root, written = spair_root
    bench = load_benchmark("spair")
    entry = bench.run_cli(bench.main, "spair")
    out, cache = tmp_path / "run", tmp_path / "cache"
    base = ["--root", str(root), "--split", "test", "--weights", str(golden_weights()), "--stride", "8",
            "--load-size", "64", "--layer", "9", "--device", "cpu", "--quiet", "--out", str(out), "--cache", str(cache)]
    assert entry(base + ["--limit", "4"]) == 0
    assert len(list(cache.glob("*.pt"))) == 4                            # 2 categories x 2 images, once per image
    assert entry(base + ["--refine", "none"]) == 0                       # resume: the last 2 pairs only
    text = capsys.readouterr().out
    assert "2 pairs in" in text and "SPair-71k test PCK" in text
    assert len(list(cache.glob("*.pt"))) == 6
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == [n for n, _ in written["test"]]
    for r, (_, d) in zip(records, written["test"]):
        x1, y1, x2, y2 = d["trg_bndbox"]
        assert r["size_bbox"] == max(x2 - x1, y2 - y1) and len(r["dist"]) == len(d["kps_ids"])
        assert r["flags"] == {k: d[k] for k in PAIR_FLAGS}
    rows = {r["group"]: r for r in csv.DictReader(open(out / "pck.csv"))}
    assert {"bird", "cat", "dog", "all", "mean", "viewpoint_variation=0", "truncation=1"} <= set(rows)
    assert int(rows["all"]["n_points"]) == sum(len(d["kps_ids"]) for _, d in written["test"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["split"] == "test" and settings["summary"]["pairs"] == 6

    # soft-argmax into another folder reuses the descriptor cache (no new entries)
    out2 = tmp_path / "run2"
    assert entry(base[:-4] + ["--out", str(out2), "--cache", str(cache), "--refine", "softargmax",
                              "--threshold", "image", "--categories", "cat"]) == 0
    assert len(list(cache.glob("*.pt"))) == 6
    rows = {r["group"]: r for r in csv.DictReader(open(out2 / "pck.csv"))}
    assert int(rows["all"]["n_pairs"]) == 2
    # user errors: one line, exit 2
    assert entry(base[:-4] + ["--out", str(out), "--layer", "11"]) == 2
    assert entry(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "not an SPair-71k tree" in err


def test_spair_benchmark_under_torchrun_equals_one_process(spair_root, tmp_path):
    """Two gloo processes split the pairs, rank 0 merges the records and scores: the same PCK table."""
    import os
    import subprocess
    import sys

    from densevit.io.paths import repo_root

    root, written = spair_root
    script = str(repo_root() / "benchmarks" / "spair.py")
    base = ["--root", str(root), "--split", "test", "--weights", str(golden_weights()), "--stride", "8",
            "--load-size", "64", "--layer", "9", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, script, *base, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, *base, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("SPair-71k test PCK") == 1
    assert (tmp_path / "two" / "pck.csv").read_text() == (tmp_path / "one" / "pck.csv").read_text()
    recs = lambda d: sorted(json.loads(l)["dist"] for l in (d / "records.jsonl").read_text().splitlines())
    assert recs(tmp_path / "two") == recs(tmp_path / "one") and len(recs(tmp_path / "one")) == 6
    assert not list((tmp_path / "two").glob("records-rank*.jsonl"))
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["summary"]["processes"] == 2
