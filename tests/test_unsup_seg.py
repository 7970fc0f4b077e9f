"""Fully unsupervised segmentation (Leopart): each step against the official code's outputs on the same features
(tests/fixtures/leopart_conformance.npz, two held-out DAVIS sets), the merge mechanics on planted data, and
densevit-segment end to end from the model (ViT-S/8, DINOv3) and from a feature store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.eval.analysis import unsup_seg as us

pytestmark = pytest.mark.usefixtures("one_thread")

FIX = Path(__file__).parent / "fixtures" / "leopart_conformance.npz"
META = json.loads(FIX.with_suffix(".json").read_text())
PARAMS, PARAMS2 = META["params"], META["params_k2"]


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of cells with the same label once b's labels are matched one-to-one to a's (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    a, b = a.ravel().astype(int), b.ravel().astype(int)
    conf = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(conf, (a, b), 1)
    r, c = linear_sum_assignment(-conf)
    return conf[r, c].sum() / a.size


def _up(x: np.ndarray, S: int) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x.astype(np.float32))[:, None], size=(S, S), mode="nearest")[:, 0].numpy()


@pytest.mark.parametrize("tag", ["a", "b"])
def test_steps_match_the_reference(ref, tag):
    S, K = PARAMS["eval_size"], PARAMS["k_fg"]
    feats = ref[f"{tag}_feats"].astype(np.float32)
    N, h, w, D = feats.shape
    x = us.normalize_and_pca(feats.reshape(-1, D), PARAMS["pca_dim"])
    assert np.allclose(np.abs(x), np.abs(ref[f"{tag}_pca"]), atol=1e-3)               # PCA up to each axis' sign
    c1 = us.kmeans_labels(ref[f"{tag}_pca"], K, PARAMS["seed"], spherical=True).reshape(N, h, w)
    assert _agreement(ref[f"{tag}_c1"], c1) >= 0.95                                # same FAISS k-means and seed
    masks = us.attention_masks(torch.from_numpy(ref[f"{tag}_attn"].astype(np.float32))).numpy()
    assert (masks == ref[f"{tag}_masks"]).all()
    c1u, mu = _up(ref[f"{tag}_c1"], S).astype(np.int64), _up(ref[f"{tag}_masks"], S)
    precs = us.cluster_precisions(c1u, mu, K)
    assert np.allclose(precs, ref[f"{tag}_precs"])
    th = us.threshold_from_gt(c1u, ref[f"{tag}_gt"], precs)
    assert th == pytest.approx(float(ref[f"{tag}_threshold"]))
    fg = np.isin(c1u, us.foreground_clusters(precs, th))
    assert (fg == ref[f"{tag}_fg"].astype(bool)).all()
    C = PARAMS["k_community"] + 1
    adj = us.cooccurrence_matrix(ref[f"{tag}_c2"], C)
    assert np.allclose(adj, ref[f"{tag}_adj"])
    edges = np.asarray(us.cooccurrence_edges(adj, PARAMS["wt"])).reshape(-1, 3)
    assert np.allclose(edges, ref[f"{tag}_edges"])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps split the cells the same way (whatever the ids: no tie-dependent numbering)."""
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return pairs == np.unique(a).size == np.unique(b).size


# The reference's merge on two cases per set: k_community 6 at markov time 1 (Infomap keeps every cluster apart) and
# k_community 12 with the reference's ViT-S/16 graph settings (weight threshold 0.09, markov time 2: Infomap merges).
CASES = {"": (PARAMS["k_community"], PARAMS["wt"], 1.0), "_k2": (PARAMS2["k_community"], PARAMS2["wt"],
                                                                PARAMS2["markov_time"])}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tag", ["a", "b"])
def test_default_merge_is_the_references(ref, tag, case):
    """Default merge (Infomap as the reference calls it) on the reference's graph: the reference's label maps, run
    by run (the reference's seeds 1, 2, 3), as partitions; its edge list is densevit's."""
    k, wt, mt = CASES[case]
    c2 = ref[f"{tag}{case}_c2"].astype(np.int64)
    edges = us.cooccurrence_edges(us.cooccurrence_matrix(c2, k + 1), wt)
    assert np.allclose(np.asarray(edges).reshape(-1, 3), ref[f"{tag}{case}_edges"])
    for run, expected in enumerate(ref[f"{tag}{case}_infomap"]):
        comm = us.merge_communities(edges, k + 1, markov_time=mt, seed=run + 1)
        assert _same_partition(comm[c2], expected)
        assert ((comm[c2] == 0) == (expected == 0)).all()              # unlinked clusters: label 0, as the reference


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tag", ["a", "b"])
def test_pipeline_default_label_maps_are_the_references(ref, tag, case):
    """End to end from the features, at the defaults (Infomap seed 1): the foreground clusters and the merged label
    maps are the reference's partitions, and so is the Hungarian mIoU."""
    k, wt, mt = CASES[case]
    res = us.unsupervised_segmentation(torch.from_numpy(ref[f"{tag}_feats"].astype(np.float32)),
                                       torch.from_numpy(ref[f"{tag}_attn"].astype(np.float32)), k_fg=PARAMS["k_fg"],
                                       k_community=k, pca_dim=PARAMS["pca_dim"], eval_size=PARAMS["eval_size"],
                                       weight_threshold=wt, markov_time=mt, seed=PARAMS["seed"], gt=ref[f"{tag}_gt"])
    assert _same_partition(res.fg_clusters, ref[f"{tag}{case}_c2"])
    expected = ref[f"{tag}{case}_infomap"][0]
    assert _same_partition(res.labels, expected)
    assert res.metrics["communities"] == np.unique(expected[expected > 0]).size
    if not case:
        assert res.metrics["miou"] == pytest.approx(float(ref[f"{tag}_miou_infomap"]))


@pytest.mark.parametrize("tag", ["a", "b"])
def test_louvain_option_differs_at_resolution_1(ref, tag):
    """``method="louvain"`` (densevit's option): at resolution 1 it merges clusters Infomap keeps apart; at
    resolution 20 it keeps them apart too and gives the reference's label maps and mIoU."""
    c2 = ref[f"{tag}_c2"].astype(np.int64)
    C = PARAMS["k_community"] + 1
    edges = us.cooccurrence_edges(ref[f"{tag}_adj"], PARAMS["wt"])
    info = ref[f"{tag}_infomap"][0]
    merged = us.merge_communities(edges, C, method="louvain", resolution=20.0, seed=0)[c2]
    assert _same_partition(info, merged)
    assert us.hungarian_miou(ref[f"{tag}_gt"], merged, 2)[0] == pytest.approx(float(ref[f"{tag}_miou_infomap"]))
    louvain = us.merge_communities(edges, C, method="louvain", seed=0)
    assert 1 <= louvain.max() < C and not _same_partition(info, louvain[c2])


def test_merge_rejects_unknown_method_and_infomap_seed_0():
    with pytest.raises(ValueError, match="louvain"):
        us.merge_communities([(0, 1, 0.5)], 2, method="leiden")
    with pytest.raises(ValueError):
        us.merge_communities([(0, 1, 0.5)], 2, seed=0)
    assert (us.merge_communities([], 3) == 0).all()


def test_planted_cooccurring_clusters_are_merged():
    """Clusters 0 and 1 always appear side by side, as do 2 and 3: two objects."""
    maps = []
    for i in range(8):
        m = np.zeros((10, 10), dtype=np.int64)
        a, b = (0, 1) if i % 2 == 0 else (2, 3)
        m[:, :5], m[:, 5:] = a, b
        maps.append(m)
    maps = np.stack(maps)
    adj = us.cooccurrence_matrix(maps, 4)
    assert adj[0, 1] == adj[1, 0] == 1.0 and adj[0, 2] == 0.0
    for method in us.MERGE_METHODS:
        comm = us.merge_communities(us.cooccurrence_edges(adj, 0.05), 4, method=method, seed=3)
        assert comm[0] == comm[1] and comm[2] == comm[3] and comm[0] != comm[2] and comm.min() >= 1, method


def test_hungarian_miou_is_label_permutation_invariant():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[5, 5, 3, 3], [4, 4, 4, 3]])
    miou, per, mapping = us.hungarian_miou(gt, pred)
    assert miou == 1.0 and mapping[5] == 0 and mapping[3] == 1 and mapping[4] == 2


def test_attention_masks_keep_the_mass_share():
    a = torch.zeros(1, 10, 10)
    a[0, 2:6, 2:6] = 1.0
    m = us.attention_masks(a, keep=0.65)[0]
    assert m[3:5, 3:5].all() and not m[8:, 8:].any()


# ----------------------------------------------------------------------------------------------------- CLI
def _voc(root: Path, seqs, frames, shared: Path) -> Path:
    davis = shared / "data" / "davis2016"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for s in seqs:
        for f in frames:
            n = f"{s}_{f:05d}"
            im = Image.open(davis / "JPEGImages/480p" / s / f"{f:05d}.jpg").convert("RGB").resize((120, 68))
            m = np.asarray(Image.open(davis / "Annotations/480p" / s / f"{f:05d}.png").convert("L").resize(
                (120, 68), Image.NEAREST)) > 127
            im.save(root / "JPEGImages" / f"{n}.jpg")
            Image.fromarray(m.astype(np.uint8), mode="L").save(root / "SegmentationClass" / f"{n}.png")
            ids.append(n)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


SMALL = ["--load-size", "64", "--k-fg", "10", "--k-community", "5", "--pca-dim", "8", "--eval-size", "24",
         "--quiet", "--device", "cpu"]


def test_segment_cli_from_model_and_store(tmp_path, shared, golden_path):
    from densevit.cli.extract import entry as extract
    from densevit.cli.segment import entry

    voc = _voc(tmp_path / "voc", ["dog", "libby"], [0, 15, 30], shared)
    out = tmp_path / "out"
    assert entry(["--voc", str(voc), "-o", str(out), "--weights", str(golden_path), *SMALL]) == 0
    summary = json.loads((out / "segment.json").read_text())
    assert 0.0 <= summary["miou"] <= 1.0 and summary["communities"] >= 1
    assert summary["settings"]["merge"] == "infomap" and summary["settings"]["merge_seed"] == 1
    lab = np.asarray(Image.open(out / "labels" / "dog_00000.png"))
    assert lab.shape == (68, 120) and lab.max() <= summary["communities"]
    assert (out / "overlays" / "libby_00030.png").is_file()
    assert entry(["--voc", str(voc), "-o", str(out), "--weights", str(golden_path), *SMALL]) == 2   # no overwrite
    # from a store: the same images' stored last-layer tokens and saliency
    store = tmp_path / "store"
    imgs = sorted((voc / "JPEGImages").glob("*.jpg"))
    assert extract([*map(str, imgs), "--store", str(store), "--weights", str(golden_path), "--stride", "8",
                    "--load-size", "64", "--layer", "11", "--facet", "token_norm", "--saliency", "--quiet",
                    "--workers", "0", "--device", "cpu"]) == 0
    out2 = tmp_path / "out2"
    small = [a for a in SMALL if a not in ("--device", "cpu")]
    i = small.index("--load-size")
    del small[i:i + 2]
    assert entry([*map(str, imgs), "-o", str(out2), "--store", str(store), "--merge", "louvain", "--resolution", "2",
                  *small]) == 0
    s2 = json.loads((out2 / "segment.json").read_text())
    assert s2["source"] == str(store) and "miou" not in s2 and s2["settings"]["merge"] == "louvain"
    assert len(list((out2 / "labels").glob("*.png"))) == len(imgs)


def test_segment_cli_dinov3_and_errors(tmp_path, shared, capsys):
    from densevit.cli.segment import entry

    voc = _voc(tmp_path / "voc", ["blackswan"], [0, 10, 20, 30], shared)
    w = shared / "golden" / "dinov3_vits16_random_official_fp16.pth"
    out = tmp_path / "o"
    assert entry(["--voc", str(voc), "-o", str(out), "--backbone", "dinov3_vits16", "--weights", str(w),
                  *SMALL]) == 0
    assert json.loads((out / "segment.json").read_text())["settings"]["k_fg"] == 10
    assert entry(["-o", str(tmp_path / "x")]) == 2
    assert entry(["--voc", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert entry(["--voc", str(voc), "-o", str(tmp_path / "y"), "--merge-seed", "0", *SMALL]) == 2
    assert entry(["--voc", str(voc), "-o", str(tmp_path / "y"), "--markov-time", "0", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "no input" in err and "PASCAL VOC layout" in err and "Traceback" not in err
    assert "--merge-seed must be at least 1" in err and "--markov-time" in err


def test_segment_is_a_densevit_command():
    r = subprocess.run([sys.executable, "-m", "densevit", "segment", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--k-community" in r.stdout
