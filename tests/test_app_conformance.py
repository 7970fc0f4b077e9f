"""Co-segmentation, part co-segmentation and correspondences compute what the reference computes.

The expected outputs in ``fixtures/app_conformance.npz`` were produced by running the reference implementation,
ShirAmir/dino-vit-features at commit 1779649078744e7d9be903325355fd481cca8103 (``cosegmentation.py``
``find_cosegmentation``, ``part_cosegmentation.py`` ``find_part_cosegmentation``, ``correspondences.py``
``find_correspondences``, each with its defaults except the arguments named below), outside this repository,
on the CPU with the golden random weights (``shared/golden/vits8_random_fp16.pth`` loaded as float32 into DINO's
own ``vision_transformer.vit_small(patch_size=8)``, facebookresearch/dino, given to the reference through its
``ViTExtractor.create_model``), with faiss 1.15.1, scikit-learn 1.9.1, OpenCV 5.0.0 and pydensecrf2. Settings:

* sets ``A`` (DAVIS-2016 kite-surf frames 0, 20, 40; ``load_size=128``, ``thresh=0.5``) and ``B`` (the
  reference's cat.jpg and ibex.jpg; ``load_size=112``, ``thresh=0.4``): co-segmentation and part
  co-segmentation, each with ``low_res_saliency_maps=True`` (the reference's default: key ``reference``) and
  ``False`` (key ``same_pass``); for A also ``three_stages=True``. The random weights make the default saliency
  threshold 0.065 pass every cluster, hence the higher thresholds (the same on both sides).
* GrabCut: the reference seeds nothing; ``cv2.setRNGSeed(0)`` (OpenCV's initial state, what a fresh process
  draws) was called once before each ``find_cosegmentation`` call, as densevit seeds once per set.
* correspondences ``P1`` (cat.jpg, ibex.jpg; ``load_size=128``) and ``P2`` (DAVIS dog frames 0 and 40;
  ``load_size=96``), with scikit-learn's ``KMeans(n_clusters, random_state=0, n_init=10)``: the ten restarts of
  the scikit-learn 1.0.1 the reference pins (scikit-learn 1.4 made one run the default).

Stored: masks and part maps (-1 background) at the reference's output resolution (the resized image), and the
reference's points ``(y, x)`` in resized pixels (token centres). Required: >= 99 % pixel agreement for masks,
>= 99 % for part maps after optimal matching of the part labels, and >= 95 % of the reference's point pairs
found within one token; measured when written: 100 % everywhere.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from densevit.apps.cli import coseg as cli_coseg
from densevit.apps.cli import match as cli_match
from densevit.apps.cli import partseg as cli_partseg
from densevit.apps.common import extract_set
from densevit.apps.correspondence import CorrespondenceConfig, find_correspondences_features, pair_features
from densevit.apps.coseg import CosegConfig, cosegment, cosegment_features
from densevit.apps.partseg import PartsegConfig, part_cosegment_features

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

FIXTURE = Path(__file__).parent / "fixtures" / "app_conformance.npz"
DAVIS = ("data", "davis2016", "JPEGImages", "480p")
SETS = {"A": ([DAVIS + ("kite-surf", f"{i:05d}.jpg") for i in (0, 20, 40)], 128, 0.5),
        "B": ([("data", "images", "cat.jpg"), ("data", "images", "ibex.jpg")], 112, 0.4)}
PAIRS = {"P1": ([("data", "images", "cat.jpg"), ("data", "images", "ibex.jpg")], 128),
         "P2": ([DAVIS + ("dog", "00000.jpg"), DAVIS + ("dog", "00040.jpg")], 96)}
SOURCES = {"reference": "reference", "same_pass": "same-pass"}


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _paths(shared, parts):
    return [shared.joinpath(*p) for p in parts]


@pytest.fixture(scope="module")
def set_features(shared, make_extractor):
    """Per set and saliency source: the images' features. One descriptor pass per image (its own saliency is
    the ``same-pass`` source); the ``reference`` source replaces the saliency by the low-resolution pass's."""
    ext = make_extractor(4)
    out = {}
    for name, (images, load, _) in SETS.items():
        same = extract_set(ext, _paths(shared, images), load, 11, "key", saliency=True, saliency_source="same-pass")
        ref = [dataclasses.replace(f, saliency=ext.reference_saliency(f.image, f.grid, load)) for f in same]
        out[name] = {"same_pass": same, "reference": ref}
    return out


def _expected_maps(expected, prefix, n):
    return [expected[f"{prefix}/{i}"] for i in range(n)]


def _part_agreement(pred: np.ndarray, ref: np.ndarray) -> float:
    """Pixel agreement with background (-1) fixed and the part labels matched one-to-one (Hungarian)."""
    assert pred.shape == ref.shape
    n = int(max(pred.max(), ref.max())) + 1
    conf = np.zeros((n, n))
    fg = (pred >= 0) & (ref >= 0)
    np.add.at(conf, (pred[fg], ref[fg]), 1)
    r, c = linear_sum_assignment(-conf)
    return float(((pred < 0) & (ref < 0)).sum() + conf[r, c].sum()) / pred.size


@pytest.mark.parametrize("source", ["reference", "same_pass"])
@pytest.mark.parametrize("name", list(SETS))
def test_cosegmentation_matches_the_reference(set_features, expected, name, source):
    _, load, thresh = SETS[name]
    feats = set_features[name][source]
    res = cosegment_features(feats, CosegConfig(load_size=load, thresh=thresh, saliency_source=SOURCES[source]))
    want = _expected_maps(expected, f"{name}/coseg/{source}", len(feats))
    agree = [float((m == e).mean()) for m, e in zip(res.masks_input, want)]
    print(f"{name} {source}: k={res.k}, agreement {agree}")
    assert all(m.shape == e.shape for m, e in zip(res.masks_input, want))
    assert min(agree) >= 0.99
    assert any(0.02 < e.mean() < 0.98 for e in want)                         # a real split somewhere


@pytest.mark.parametrize("name, source, three", [("A", "reference", False), ("A", "same_pass", False),
                                                  ("A", "reference", True), ("B", "reference", False),
                                                  ("B", "same_pass", False)])
def test_part_cosegmentation_matches_the_reference(set_features, expected, name, source, three):
    key = f"{name}/partseg{'3' if three else ''}/{source}"
    _, load, thresh = SETS[name]
    feats = set_features[name][source]
    cfg = PartsegConfig(load_size=load, thresh=thresh, saliency_source=SOURCES[source], three_stages=three,
                        crf="dense")
    res = part_cosegment_features(feats, len(feats), cfg)
    want = _expected_maps(expected, key, len(feats))
    agree = [_part_agreement(m, e) for m, e in zip(res.parts_input, want)]
    print(f"{key}: agreement {agree}")
    assert min(agree) >= 0.99
    assert all(len(np.unique(e)) >= 3 for e in want)                         # background and >= 2 parts


def _tokens(points: np.ndarray, stride: int = 4, half_patch: int = 4) -> np.ndarray:
    """The reference's points ``(y, x)`` in resized pixels (token centres) -> ``(row, col)`` token indices."""
    t = (points - half_patch) / stride
    assert np.array_equal(t, np.round(t))
    return t.astype(int)


@pytest.mark.parametrize("name", list(PAIRS))
def test_correspondences_match_the_reference(shared, make_extractor, expected, name):
    images, load = PAIRS[name]
    fa, fb = pair_features(make_extractor(4), *_paths(shared, images), load, 9, "key", True, True)
    res = find_correspondences_features(fa, fb, CorrespondenceConfig(load_size=load))
    ra, rb = _tokens(expected[f"{name}/match/points_a"]), _tokens(expected[f"{name}/match/points_b"])
    wa, wb = fa.grid.shape[1], fb.grid.shape[1]
    da = np.stack([res.tokens_a // wa, res.tokens_a % wa], 1)
    db = np.stack([res.tokens_b // wb, res.tokens_b % wb], 1)
    found = [bool(((np.abs(da - a).max(1) <= 1) & (np.abs(db - b).max(1) <= 1)).any()) for a, b in zip(ra, rb)]
    print(f"{name}: {len(ra)} reference pairs, {len(da)} pairs, {np.mean(found):.3f} within one token")
    assert len(ra) == 10 and len(da) == len(ra)
    assert np.mean(found) >= 0.95


def test_cosegment_default_path_matches_the_reference(shared, make_extractor, expected):
    """The public entry point with nothing but the set's inputs: its defaults are the reference's."""
    images, load, thresh = SETS["B"]
    res = cosegment(make_extractor(4), _paths(shared, images), load_size=load, thresh=thresh)
    want = _expected_maps(expected, "B/coseg/reference", len(images))
    assert min(float((m == e).mean()) for m, e in zip(res.masks_input, want)) >= 0.99


def test_command_defaults_are_the_reference(tmp_path):
    base = ["x.jpg", "--out", str(tmp_path)]
    co = cli_coseg.config_from_args(cli_coseg.build_parser().parse_args(base))
    ps = cli_partseg.config_from_args(cli_partseg.build_parser().parse_args(base))
    ref = dict(seed=1234, max_points_per_centroid=256, saliency_source="reference", upsample_masks="reference",
               n_iter=300, n_redo=10, sample_interval=100, thresh=0.065, elbow=0.975, votes_percentage=75.0)
    for cfg, default in ((co, CosegConfig()), (ps, PartsegConfig())):
        assert {k: getattr(cfg, k) for k in ref} == ref and cfg == default
    assert (co.grabcut_seed, co.grabcut_seeding) == (0, "set")
    args = cli_match.build_parser().parse_args(["a.jpg", "b.jpg", "--out", str(tmp_path)])
    assert (args.clustering, args.fg_test, args.seed, args.num_pairs) == ("sklearn", "reference", 0, 10)
    d = CorrespondenceConfig()
    assert (d.clustering, d.fg_test, d.seed, d.n_redo, d.layer, d.bin, d.thresh) == \
        ("sklearn", "reference", 0, 10, 9, True, 0.05)
