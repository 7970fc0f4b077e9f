"""Part co-segmentation: constructed features with known parts (both CRF backends), the CRF smoothing itself,
and real images with the golden random weights (shapes, ranges, determinism, three stages, augmentations)."""
import importlib.util
import sys

import numpy as np
import pytest
import torch
from densevit.features.source import ImageFeatures
from densevit.apps.partseg import (
    PartsegConfig,
    extract_partseg_features,
    part_cosegment,
    part_cosegment_features,
)
from densevit.apps.refine import crf_backend, dense_crf
from PIL import Image

from densevit.errors import DensevitError
from densevit.models.grid import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

LOAD = 48
FAST = dict(sample_interval=1, n_iter=20, n_redo=2)
HAS_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None


def _two_part_object(x0, y0, side, size=96, seed=0, name="syn"):
    """Grey image with a square object: left half red, right half blue. Descriptors: left half ~e0, right half
    ~e1, background ~e2 (left of the image centre) / ~e3 (right); saliency high on the object."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 128, np.uint8)
    half = side // 2
    img[y0:y0 + side, x0:x0 + half] = (220, 30, 30)
    img[y0:y0 + side, x0 + half:x0 + side] = (30, 30, 220)
    truth = np.full((size, size), -1)
    truth[y0:y0 + side, x0:x0 + half] = 0
    truth[y0:y0 + side, x0 + half:x0 + side] = 1
    pil = Image.fromarray(img)
    grid = TokenGrid(8, 4, (size, size), (size, size))
    c = grid.token_centers().numpy().astype(int)
    tok = truth[c[:, 1], c[:, 0]]
    d = rng.normal(0, 0.05, (grid.num_tokens, 16)).astype(np.float32)
    d[tok == 0, 0] += 1
    d[tok == 1, 1] += 1
    d[(tok == -1) & (c[:, 0] < size / 2), 2] += 1
    d[(tok == -1) & (c[:, 0] >= size / 2), 3] += 1
    sal = np.where(tok >= 0, 0.9, 0.02).astype(np.float32)
    return ImageFeatures(name, pil, pil, grid, torch.from_numpy(d), torch.from_numpy(sal)), truth


def _accuracy_up_to_permutation(pred, truth):
    """Pixel accuracy with background fixed and the two part ids matched either way."""
    direct = (pred == truth).mean()
    swapped = np.where(truth >= 0, 1 - truth, -1)
    return max(direct, (pred == swapped).mean())


@pytest.mark.parametrize("crf", ["none", "approx", "dense"])      # pydensecrf2 is in the dev extra
def test_constructed_parts_are_recovered_and_consistent(crf):
    pairs = [_two_part_object(16, 20, 48, seed=0), _two_part_object(30, 28, 56, seed=1),
             _two_part_object(8, 8, 40, seed=2)]
    feats = [p[0] for p in pairs]
    res = part_cosegment_features(feats, 3, PartsegConfig(num_parts=2, crf=crf, **FAST))
    assert res.num_parts == 2 and res.crf == crf
    for (f, truth), parts in zip(pairs, res.parts):
        assert parts.shape == truth.shape and parts.dtype == np.int16
        # nearest token alone; the CRF snaps to the colour edges (its strong Gaussian term rounds the corners)
        assert _accuracy_up_to_permutation(parts, truth) > {"none": 0.9, "approx": 0.95, "dense": 0.97}[crf]
    # the same part id means the same part in every image: the red half has one id everywhere
    red = [np.bincount(p[t == 0] + 1, minlength=3).argmax() for (f, t), p in zip(pairs, res.parts)]
    assert len(set(red)) == 1 and red[0] != 0


def test_crf_smoothing_removes_speckle_and_follows_edges():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255
    truth = np.zeros((64, 64), int)
    truth[:, 32:] = 1
    unary = np.stack([np.where(truth == 0, 0.0, 1.0), np.where(truth == 1, 0.0, 1.0)], -1).astype(np.float32)
    flip = rng.random((64, 64)) < 0.1
    unary[flip] = unary[flip][:, ::-1] * 0.5                    # 10% speckle, less confident than the truth
    raw, _ = dense_crf(img, unary, backend="none")
    smooth, used = dense_crf(img, unary, backend="approx")
    assert used == "approx"
    assert (raw != truth).mean() > 0.08 and (smooth != truth).mean() < 0.01


def test_dense_crf_required_but_missing_is_a_user_error(monkeypatch):
    assert HAS_PYDENSECRF and crf_backend("auto") == "dense"
    monkeypatch.setitem(sys.modules, "pydensecrf", None)          # as if not installed: its import fails
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert crf_backend("auto") == "approx"
    with pytest.raises(DensevitError, match="pydensecrf"):
        crf_backend("dense")


def test_too_little_foreground_is_a_user_error():
    feats = [_two_part_object(16, 20, 48, seed=i)[0] for i in range(2)]
    with pytest.raises(DensevitError, match="foreground"):
        part_cosegment_features(feats, 2, PartsegConfig(num_parts=2, thresh=0.95, **FAST))


# ------------------------------------------------------------------------------------------- real images
@pytest.fixture(scope="module")
def small_pair(images):
    out = []
    for p in images:
        im = Image.open(p).convert("RGB")
        out.append(im.resize((im.width // 16, im.height // 16), Image.BILINEAR))
    return out


def test_real_images_shapes_ranges_and_determinism(make_extractor, small_pair):
    cfg = PartsegConfig(load_size=LOAD, thresh=0.3, crf="approx")
    feats = extract_partseg_features(make_extractor(4), small_pair, cfg)
    r1 = part_cosegment_features(feats, 2, cfg)
    r2 = part_cosegment_features(feats, 2, cfg)
    for img, f, p, tp, q in zip(small_pair, feats, r1.parts, r1.token_parts, r2.parts):
        assert p.shape == (img.height, img.width)
        assert p.min() >= -1 and p.max() < r1.num_parts
        assert tp.shape == f.grid.shape and tp.min() >= -1
        assert np.array_equal(p, q)
    assert r1.num_parts == 4 and r1.common is None
    assert np.unique(np.concatenate([p.ravel() for p in r1.parts])).size >= 3


def test_real_images_three_stages_with_augmentations(make_extractor, small_pair):
    # densevit's former computation, by its named options (with the reference's defaults these random-weight
    # inputs have no part common to both images, which the three stages refuse)
    former = dict(seed=0, max_points_per_centroid=None, saliency_source="same-pass", upsample_masks="token-centre")
    res = part_cosegment(make_extractor(4), small_pair, load_size=64, thresh=0.3, num_parts=3,
                         three_stages=True, num_crop_augmentations=1, crf="approx", **former)
    assert len(res.parts) == 2 and res.names == ["image0", "image1"]          # augmentations dropped
    assert res.common is not None and res.common.size >= 1
    for img, p in zip(small_pair, res.parts):
        assert p.shape == (img.height, img.width) and p.min() >= -1 and p.max() < 3
