"""Semantic correspondences and dense keypoint transfer with the golden random weights: real image pairs
(shapes, ranges, determinism, best-buddy property) and constructed pairs whose answer is known (an image and
its shifted by whole / fractional tokens and rescaled by +-15% copy)."""
import numpy as np
import pytest
import torch
from densevit.apps.correspondence import (
    CorrespondenceConfig,
    find_correspondences,
    find_correspondences_features,
    pair_features,
    transfer_keypoints,
    transfer_keypoints_features,
)
from PIL import Image

from densevit.features.source import ImageFeatures
from densevit.apps.correspondence import salient_buddies
from densevit.errors import DensevitError
from densevit.matching.knn import best_buddies, nearest_both_ways
from densevit.models.grid import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# Constructed pairs: crops of W x H "original" pixels fed at LOAD (= half the original size), so every point
# goes through the token grid's original <-> input scaling. One token = the 8-pixel patch = 16 original pixels;
# the token spacing (stride 4) is 8 original pixels.
W, H, LOAD = 192, 144, 72
X0, Y0 = 40, 40
TOKEN = 16.0


@pytest.fixture(scope="module")
def base(images):
    return Image.open(images[0]).convert("RGB").resize((300, 225), Image.LANCZOS)


@pytest.fixture(scope="module")
def ext(make_extractor):
    return make_extractor(4)


@pytest.fixture(scope="module")
def feat_a(ext, base):
    a = base.crop((X0, Y0, X0 + W, Y0 + H))
    return pair_features(ext, a, a, LOAD, 9, "key", True, True)[0]


def _shifted(base, dx, dy):
    return base.crop((X0 + dx, Y0 + dy, X0 + dx + W, Y0 + dy + H)), lambda p: p - np.array([dx, dy])


def _rescaled(base, s):
    big = base.resize((round(base.width * s), round(base.height * s)), Image.LANCZOS)
    ox, oy = round((X0 + W / 2) * s - W / 2), round((Y0 + H / 2) * s - H / 2)
    return big.crop((ox, oy, ox + W, oy + H)), lambda p: (p + np.array([X0, Y0])) * s - np.array([ox, oy])


def _errors(ext, feat_a, b_img, truth):
    """Dense transfer errors of A's token centres whose true position lies inside B (away from the border),
    and the correspondence pairs' errors."""
    fb = pair_features(ext, b_img, b_img, LOAD, 9, "key", True, True)[0]
    pts = feat_a.grid.token_centers().numpy()
    tp = truth(pts)
    inside = (tp[:, 0] > TOKEN / 2) & (tp[:, 1] > TOKEN / 2) & (tp[:, 0] < W - TOKEN / 2) & (tp[:, 1] < H - TOKEN / 2)
    moved, sims = transfer_keypoints_features(feat_a, fb, pts[inside])
    assert moved.shape == (inside.sum(), 2) and sims.shape == (inside.sum(),)
    dense = np.linalg.norm(moved - tp[inside], axis=1)
    res = find_correspondences_features(feat_a, fb, CorrespondenceConfig(load_size=LOAD))
    pairs = np.linalg.norm(res.points_b - truth(res.points_a), axis=1)
    return dense, pairs


# Measured with the golden weights (dense within one token / pairs within one token): whole 1.00 / 1.0,
# half 0.75 / 0.6, quarter 0.98 / 0.9, x1.15 0.96 / 1.0, x0.85 0.96 / 0.9.
@pytest.mark.parametrize("dx, dy, exact, within, pairs_within", [
    (16, 8, 0.9, 0.95, 0.9),  # whole tokens (2, 1 token spacings): most points land on the exact token
    (28, 20, 0.0, 0.6, 0.5),  # half a token spacing on both axes: the hardest case, equidistant tokens
    (26, -14, 0.0, 0.85, 0.7),  # quarter token spacings
])
def test_shifted_copy_maps_points_to_their_true_positions(ext, feat_a, base, dx, dy, exact, within, pairs_within):
    b_img, truth = _shifted(base, dx, dy)
    dense, pairs = _errors(ext, feat_a, b_img, truth)
    print(f"shift {dx},{dy}: exact {(dense <= 1e-6).mean():.3f} <=1 token {(dense <= TOKEN).mean():.3f} "
          f"pairs {(pairs <= TOKEN).mean():.2f} of {len(pairs)}")
    assert (dense <= 1e-6).mean() >= exact
    assert (dense <= TOKEN).mean() >= within
    assert len(pairs) >= 5 and (pairs <= TOKEN).mean() >= pairs_within


@pytest.mark.parametrize("scale, within", [(1.15, 0.85), (0.85, 0.85)])
def test_rescaled_copy_maps_points_to_their_true_positions(ext, feat_a, base, scale, within):
    b_img, truth = _rescaled(base, scale)
    dense, pairs = _errors(ext, feat_a, b_img, truth)
    print(f"scale {scale}: <=1 token {(dense <= TOKEN).mean():.3f} pairs {(pairs <= TOKEN).mean():.2f}")
    assert (dense <= TOKEN).mean() >= within
    assert len(pairs) >= 5 and (pairs <= TOKEN).mean() >= 0.7


def test_real_pair_points_shapes_ranges_determinism_and_best_buddies(ext, images):
    small = [Image.open(p).convert("RGB") for p in images]
    small = [im.resize((im.width // 8, im.height // 8), Image.BILINEAR) for im in small]
    cfg = CorrespondenceConfig(load_size=64, num_pairs=8)
    fa, fb = pair_features(ext, small[0], small[1], 64, 9, "key", True, True)
    r1 = find_correspondences_features(fa, fb, cfg)
    r2 = find_correspondences(ext, small[0], small[1], cfg)                  # full path, fresh extraction
    n = len(r1.points_a)
    assert 1 <= n <= 8 and r1.points_b.shape == (n, 2) and r1.num_buddies >= n
    for pts, img in ((r1.points_a, small[0]), (r1.points_b, small[1])):
        assert (pts >= 0).all() and (pts[:, 0] < img.width).all() and (pts[:, 1] < img.height).all()
    assert np.all(np.diff(r1.saliency) <= 0) and (r1.saliency > cfg.thresh).all()
    assert np.all(np.abs(r1.similarity) <= 1 + 1e-5)
    np.testing.assert_array_equal(r1.points_a, r2.points_a)
    np.testing.assert_array_equal(r1.points_b, r2.points_b)
    # every pair is a pair of best buddies, and the points are their tokens' centres (TokenGrid)
    ia, ib = best_buddies(fa.descriptors, fb.descriptors)
    buddies = set(zip(ia.tolist(), ib.tolist()))
    assert all((a, b) in buddies for a, b in zip(r1.tokens_a.tolist(), r1.tokens_b.tolist()))
    np.testing.assert_allclose(r1.points_a, fa.grid.tokens_to_pixels(torch.from_numpy(r1.tokens_a)).numpy())


def test_transfer_keypoints_end_to_end(ext, base):
    a = base.crop((X0, Y0, X0 + W, Y0 + H))
    b, truth = _shifted(base, 16, 8)
    pts = np.array([[60.0, 50.0], [120.0, 90.0], [100.0, 70.0]])
    out, sims = transfer_keypoints(ext, a, b, pts, load_size=LOAD)
    assert out.shape == (3, 2) and sims.shape == (3,)
    assert (np.linalg.norm(out - truth(pts), axis=1) <= TOKEN).all()


def test_no_salient_buddies_gives_no_pairs(feat_a):
    res = find_correspondences_features(feat_a, feat_a, CorrespondenceConfig(thresh=1.0))
    assert res.points_a.shape == (0, 2) and res.num_buddies == 0
    with pytest.raises(DensevitError):
        CorrespondenceConfig(num_pairs=0).validate()


def _two_tokens(desc, sal, name):
    img = Image.new("RGB", (16, 8))
    grid = TokenGrid(8, 8, (8, 16), (8, 16))                                # one row of two tokens
    return ImageFeatures(name, img, img, grid, torch.tensor(desc, dtype=torch.float32),
                         torch.tensor(sal, dtype=torch.float32))


def test_reference_foreground_test_lets_a_background_token_of_b_through():
    """Buddies (A0, B0); B0 is background, but salient B1's nearest neighbour in A is A0: the reference's mask
    keeps the pair (``--fg-test reference``, the default); ``both`` requires B0 itself to be salient."""
    fa = _two_tokens([[1.0, 0.0], [0.0, 1.0]], [0.9, 0.9], "a")
    fb = _two_tokens([[1.0, 0.0], [0.9, 0.1]], [0.0, 0.9], "b")
    ref = find_correspondences_features(fa, fb, CorrespondenceConfig())
    assert ref.tokens_a.tolist() == [0] and ref.tokens_b.tolist() == [0] and ref.num_buddies == 1
    both = find_correspondences_features(fa, fb, CorrespondenceConfig(fg_test="both"))
    assert both.num_buddies == 0 and both.tokens_a.size == 0


def test_foreground_tests_and_clusterings_on_a_real_pair(ext, images):
    small = [Image.open(p).convert("RGB") for p in images]
    small = [im.resize((im.width // 8, im.height // 8), Image.BILINEAR) for im in small]
    fa, fb = pair_features(ext, small[0], small[1], 64, 9, "key", True, True)
    t = 0.05
    ref = set(zip(*(x.tolist() for x in salient_buddies(fa, fb, t, "reference"))))
    both = set(zip(*(x.tolist() for x in salient_buddies(fa, fb, t, "both"))))
    _, nn_ba = nearest_both_ways(fa.descriptors, fb.descriptors)
    assert both and both <= ref
    for a, b in ref:
        assert fa.saliency[a] > t and (fb.saliency[nn_ba == a] > t).any()
    assert all(fb.saliency[b] > t for _, b in both)
    for clustering in ("sklearn", "faiss"):
        cfg = CorrespondenceConfig(clustering=clustering, num_pairs=4)
        r1, r2 = find_correspondences_features(fa, fb, cfg), find_correspondences_features(fa, fb, cfg)
        assert len(r1.tokens_a) == min(4, len(ref)) and r1.num_buddies == len(ref)
        assert set(zip(r1.tokens_a.tolist(), r1.tokens_b.tolist())) <= ref
        np.testing.assert_array_equal(r1.tokens_a, r2.tokens_a)                # deterministic
    with pytest.raises(DensevitError, match="clustering"):
        CorrespondenceConfig(clustering="kmeans").validate()
