"""DAVIS measures against hand-computed values, and the DAVIS dataset / mask I/O."""
import numpy as np
import pytest
from PIL import Image

from densevit.errors import DensevitError
from densevit.eval.datasets.davis import DAVIS_PALETTE, DavisDataset, labels_for_year, read_mask, write_mask
from densevit.eval.metrics.davis import (
    DavisScores,
    boundary_tolerance,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    disk,
    evaluate_semisupervised,
    f_measure,
    seg2bmap,
)
from densevit.io.paths import shared_dir


def square(hw=(100, 120), top=30, left=30, side=40):
    m = np.zeros(hw, bool)
    m[top:top + side, left:left + side] = True
    return m


# ------------------------------------------------------------------------------------------------ J
def test_iou_self_and_empty_cases():
    m = square()
    empty = np.zeros_like(m)
    assert db_eval_iou(m, m) == 1.0
    assert db_eval_iou(empty, empty) == 1.0      # object absent and not predicted: 1, as the toolkit
    assert db_eval_iou(m, empty) == 0.0          # empty prediction
    assert db_eval_iou(empty, m) == 0.0          # object absent from the frame but predicted


def test_iou_shift_by_k_pixels():
    s, k = 40, 6
    gt, pred = square(side=s), np.roll(square(side=s), k, axis=1)
    # overlap s*(s-k), union s*(s+k)
    assert db_eval_iou(gt, pred) == pytest.approx((s - k) / (s + k))
    frames = np.stack([gt, gt, gt]), np.stack([gt, pred, np.zeros_like(gt)])
    np.testing.assert_allclose(db_eval_iou(*frames), [1.0, (s - k) / (s + k), 0.0])


# ------------------------------------------------------------------------------------------------ F
def test_seg2bmap_by_hand():
    seg = np.zeros((6, 6), bool)
    seg[2:4, 2:4] = True
    expected = np.zeros((6, 6), bool)
    # the boundary is a ring offset half a pixel towards the origin: rows 1..3, cols 1..3
    expected[1, 1:4] = expected[3, 1:4] = expected[1:4, 1] = expected[1:4, 3] = True
    np.testing.assert_array_equal(seg2bmap(seg), expected)
    # toolkit edge conventions: last row compares east only, last column south only, corner never
    full = np.ones((3, 3), bool)
    np.testing.assert_array_equal(seg2bmap(full), np.zeros((3, 3), bool))
    corner = np.zeros((3, 3), bool)
    corner[2, 2] = True
    np.testing.assert_array_equal(seg2bmap(corner), [[0, 0, 0], [0, 1, 1], [0, 1, 0]])


def test_disk_and_tolerance():
    np.testing.assert_array_equal(disk(2), [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1],
                                            [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    assert boundary_tolerance((480, 854)) == 8        # ceil(0.008 * 979.6)
    assert boundary_tolerance((100, 100)) == 2        # ceil(1.13)
    assert boundary_tolerance((480, 854), 3) == 3      # >= 1: pixels


def test_f_self_and_empty_cases():
    m = square()
    empty = np.zeros_like(m)
    assert f_measure(m, m) == 1.0
    assert f_measure(empty, empty) == 1.0     # no boundary anywhere: precision = recall = 1
    assert f_measure(empty, m) == 0.0         # empty prediction: precision 1, recall 0
    assert f_measure(m, empty) == 0.0         # object absent from the frame: precision 0, recall 1


def test_f_shift_within_tolerance_is_perfect():
    gt = square()
    for k in range(4):
        assert f_measure(np.roll(gt, k, axis=1), gt, bound_th=3) == 1.0


def test_f_shift_beyond_tolerance_by_hand():
    # Square of side s: its boundary is a ring of 4s pixels. Shifted right by k > d (tolerance d pixels), the
    # predicted ring matches: on each horizontal side the s+1-k pixels above the ground-truth side plus d beyond
    # its end; on the left side the 2d pixels within d rows of the top/bottom rows; on the right side none.
    s, k, d = 40, 6, 3
    gt = square(side=s)
    pred = np.roll(gt, k, axis=1)
    expected = (2 * (s + 1 - k + d) + 2 * d) / (4 * s)   # precision = recall by symmetry
    assert f_measure(pred, gt, bound_th=d) == pytest.approx(expected)
    np.testing.assert_allclose(db_eval_boundary(np.stack([gt, gt]), np.stack([gt, pred]), bound_th=d),
                               [1.0, expected])


# ------------------------------------------------------------------------------------------------ statistics
def test_db_statistics_by_hand():
    v = np.array([1, 1, 1, 1, 0, 0, 0, 0], float)
    # bin edges round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: first bin v[0:3], last bin v[5:8]
    mean, recall, decay = db_statistics(v)
    assert (mean, recall, decay) == (0.5, 0.5, 1.0)
    v = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    mean, recall, decay = db_statistics(v)
    assert mean == pytest.approx(0.55)
    assert recall == pytest.approx(4 / 8)                       # strictly > 0.5
    assert decay == pytest.approx(0.8 - 0.3)                     # mean(0.9,.8,.7) - mean(.4,.3,.2)
    assert db_statistics([np.nan, 1.0, 0.0])[0] == 0.5          # NaNs ignored


def test_semisupervised_protocol_multi_object():
    H, W = 40, 60
    gt = np.zeros((5, H, W), np.uint8)
    gt[:, 5:20, 5:20] = 1
    gt[:, 20:35, 30:50] = 2
    gt[2, 20:35, 30:50] = 0                   # object 2 absent from frame 2
    pred = gt.copy()
    pred[3] = 0                               # frame 3: nothing predicted
    pred[0] = 0                               # first and last frames are not scored
    pred[4] = 0
    J, F = evaluate_semisupervised(gt, pred)
    assert J.shape == F.shape == (2, 3)       # 2 objects x frames 1..3
    np.testing.assert_allclose(J, [[1, 1, 0], [1, 1, 0]])   # absent and not predicted: 1
    np.testing.assert_allclose(F, [[1, 1, 0], [1, 1, 0]])
    with pytest.raises(DensevitError):
        evaluate_semisupervised(gt, np.where(gt > 0, 3, 0).astype(np.uint8))

    scores = DavisScores()
    scores.add_sequence("seq", J, F)
    g = scores.global_row()
    assert g["J-Mean"] == pytest.approx(2 / 3) and g["F-Mean"] == pytest.approx(2 / 3)
    assert g["J&F-Mean"] == pytest.approx(2 / 3)
    assert g["J-Recall"] == pytest.approx(2 / 3)
    assert [r["Sequence"] for r in scores.per_object_rows()] == ["seq_1", "seq_2"]


# ------------------------------------------------------------------------------------------------ dataset / io
def test_palette_and_mask_roundtrip(tmp_path):
    assert DAVIS_PALETTE.shape == (256, 3)
    assert DAVIS_PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert DAVIS_PALETTE[255].tolist() == [224, 224, 192]
    m = np.zeros((7, 9), np.uint8)
    m[1:3, 2:5] = 1
    m[4:6, 1:3] = 7
    write_mask(tmp_path / "m.png", m)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
        assert list(im.getpalette()[3:6]) == [128, 0, 0]
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), m)
    # RGB renderings of palette masks and greyscale masks read back as ids
    Image.fromarray(DAVIS_PALETTE[m]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), m)
    Image.fromarray(m * 30).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), m * 30)
    with pytest.raises(DensevitError):
        read_mask(tmp_path / "missing.png")


def test_labels_for_year():
    m = np.array([[0, 255, 1], [2, 0, 255]], np.uint8)
    np.testing.assert_array_equal(labels_for_year(m, "2016"), [[0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(labels_for_year(m, "2017"), [[0, 0, 1], [2, 0, 0]])   # 255 = void


def test_davis2017_layout(tmp_path):
    root = tmp_path / "DAVIS"
    for seq, n in (("a", 3), ("b", 2)):
        (root / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (root / "Annotations" / "480p" / seq).mkdir(parents=True)
        for f in range(n):
            Image.new("RGB", (8, 6)).save(root / "JPEGImages" / "480p" / seq / f"{f:05d}.jpg")
            m = np.zeros((6, 8), np.uint8)
            m[1:3, 1:3] = 1
            m[3:5, 4:7] = 2
            m[0, 0] = 255
            write_mask(root / "Annotations" / "480p" / seq / f"{f:05d}.png", m)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("a\nb\n")
    ds = DavisDataset(root, "2017", "val")
    assert ds.sequences == ["a", "b"]
    assert [p.name for p in ds.frames("a")] == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert ds.num_objects("a") == 2
    gt, names = ds.ground_truth("a")
    assert gt.shape == (3, 6, 8) and names == ["00000", "00001", "00002"] and gt[0, 0, 0] == 0
    assert DavisDataset(root, "2017", "val", sequences=["b"]).sequences == ["b"]
    with pytest.raises(DensevitError):
        DavisDataset(root, "2017", "val", sequences=["zzz"])
    with pytest.raises(DensevitError):
        DavisDataset(root, "2016", "val")            # no 2016 image set here
    with pytest.raises(DensevitError):
        DavisDataset(tmp_path / "nowhere", "2017")


def test_shared_davis2016():
    root = shared_dir() / "data" / "davis2016"
    if not root.is_dir():
        pytest.skip("shared DAVIS-2016 subset not available")
    ds = DavisDataset(root, "2016", "val")
    assert len(ds) == 12 and "blackswan" in ds.sequences
    first = ds.first_mask("blackswan")
    assert first.shape == (480, 854) and set(np.unique(first)) == {0, 1}
    assert len(ds.frames("blackswan")) == len(ds.mask_paths("blackswan")) == 50
