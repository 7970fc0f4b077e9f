"""Co-segmentation: real images with the golden random weights (shapes, ranges, determinism, identical images)
and constructed features whose answer is known (voting, GrabCut, pixel mapping, outliers)."""
import numpy as np
import pytest
import torch
from densevit.apps.common import extract_set, tokens_to_image
from densevit.features.source import ImageFeatures
from densevit.apps.coseg import (
    CosegConfig,
    cosegment,
    cosegment_features,
    find_outliers,
    grabcut_refine,
    vote_salient_clusters,
)
from PIL import Image

from densevit.apps.common import mask_to_input
from densevit.errors import DensevitError
from densevit.models.grid import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

LOAD = 64
FAST = dict(sample_interval=1, n_iter=20, n_redo=2)                          # k-means effort for tiny inputs


@pytest.fixture(scope="module")
def pil_images(images):
    # The 12-megapixel photos shrunk once (the apps take PIL images as well as paths).
    out = []
    for p in images:
        im = Image.open(p).convert("RGB")
        out.append(im.resize((im.width // 8, im.height // 8), Image.BILINEAR))
    return out


# ------------------------------------------------------------------------------------------- real images
def test_real_images_masks_shapes_ranges_and_determinism(make_extractor, pil_images):
    ext = make_extractor(4)
    r1 = cosegment(ext, pil_images, load_size=LOAD, thresh=0.3)
    feats = extract_set(ext, pil_images, LOAD, 11, "key", saliency=True,   # the same extraction, reused
                        saliency_source="reference")
    r2 = cosegment_features(feats, CosegConfig(load_size=LOAD, thresh=0.3))
    assert len(r1.masks) == 2 and r1.names == ["image0", "image1"]
    for img, m, tm, lab in zip(pil_images, r1.masks, r1.token_masks, r1.labels):
        assert m.dtype == bool and m.shape == (img.height, img.width)        # original resolution
        assert lab.shape == tm.shape and lab.min() >= 0 and lab.max() < r1.k
        assert np.array_equal(tm, np.isin(lab, r1.salient))
    assert 1 <= r1.k <= 14 and r1.votes.shape == (r1.k,) and r1.inliers.all()
    assert set(r1.timings) >= {"extraction", "clustering", "voting", "grabcut"}
    for a, b in zip(r1.masks, r2.masks):
        assert np.array_equal(a, b)
    assert r1.k == r2.k and np.array_equal(r1.salient, r2.salient)


def test_identical_images_give_identical_masks(make_extractor, shared):
    frame = Image.open(shared / "data" / "davis2016" / "JPEGImages" / "480p" / "blackswan" / "00000.jpg")
    # GrabCut reseeded per image (the reference draws one stream through the set, so its GrabCut results for
    # identical images may differ; the token masks may not)
    res = cosegment(make_extractor(4), [frame, frame.copy(), frame.copy()], load_size=LOAD, thresh=0.5,
                    grabcut_seeding="image")
    assert res.masks[0].shape == (480, 854)
    assert 0 < res.masks[0].mean() < 1                                       # a real split, not all / nothing
    for m, t in zip(res.masks[1:], res.token_masks[1:]):
        assert np.array_equal(m, res.masks[0]) and np.array_equal(t, res.token_masks[0])


def test_fewer_than_two_images_is_a_user_error(make_extractor, pil_images):
    with pytest.raises(DensevitError, match="at least two"):
        cosegment(make_extractor(4), pil_images[:1], load_size=LOAD)


# ----------------------------------------------------------------------------- constructed known answers
def _synthetic(x0: int, y0: int, side: int, size: int = 96, rng=None, cls=None, name="syn") -> ImageFeatures:
    """A grey image with a red square; its tokens' descriptors are 'object' (near e0) inside the square and
    'background' (near e1 or e2, left / right half) outside; saliency high on the object only."""
    rng = rng or np.random.default_rng(0)
    img = np.full((size, size, 3), 128, np.uint8)
    img[y0:y0 + side, x0:x0 + side] = (220, 30, 30)
    pil = Image.fromarray(img)
    grid = TokenGrid(8, 4, (size, size), (size, size))
    c = grid.token_centers().numpy()
    inside = (c[:, 0] >= x0) & (c[:, 0] < x0 + side) & (c[:, 1] >= y0) & (c[:, 1] < y0 + side)
    d = rng.normal(0, 0.05, (grid.num_tokens, 16)).astype(np.float32)
    d[inside, 0] += 1
    d[~inside & (c[:, 0] < size / 2), 1] += 1
    d[~inside & (c[:, 0] >= size / 2), 2] += 1
    sal = np.where(inside, 0.9, 0.02).astype(np.float32)
    return ImageFeatures(name, pil, pil, grid, torch.from_numpy(d), torch.from_numpy(sal),
                         None if cls is None else torch.as_tensor(cls, dtype=torch.float32))


def _truth(x0, y0, side, size=96):
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_constructed_set_recovers_the_object_through_voting_and_grabcut():
    rng = np.random.default_rng(1)
    boxes = [(20, 24, 40), (40, 30, 36), (10, 10, 50)]
    feats = [_synthetic(*b, rng=rng) for b in boxes]
    res = cosegment_features(feats, CosegConfig(**FAST))
    assert len(res.salient) >= 1
    for b, m, tm, f in zip(boxes, res.masks, res.token_masks, feats):
        truth = _truth(*b)
        assert _iou(m, truth) > 0.95                                         # GrabCut snaps to the colour edge
        tok_truth = f.saliency.numpy().reshape(tm.shape) > 0.5
        assert np.array_equal(tm, tok_truth)                                 # exactly the object's tokens
    assert all(res.grabcut_applied)
    plain = cosegment_features(feats, CosegConfig(**FAST, grabcut=False))
    for b, m in zip(boxes, plain.masks):
        assert _iou(m, _truth(*b)) > 0.8                                     # token-level mask, nearest centre


def test_vote_threshold_and_percentage():
    labels = [np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), np.array([1, 1, 0, 0, 0])]
    sal = [np.array([0.9, 0.9, 0.0, 0.1, 0.5]), np.array([0.8, 0.0, 0.0, 0.0, 0.0]),
           np.array([0.0, 0.0, 0.2, 0.2, 0.2])]
    salient, votes = vote_salient_clusters(labels, sal, 3, thresh=0.065, votes_percentage=75)
    assert votes.tolist() == [3, 0, 1]                                       # cluster 2 absent from 2 images
    assert salient.tolist() == [0]                                           # ceil(3 * 0.75) = 3 votes needed
    salient, _ = vote_salient_clusters(labels, sal, 3, thresh=0.065, votes_percentage=30)
    assert salient.tolist() == [0, 2]


def test_outlier_images_are_left_out_with_empty_masks():
    rng = np.random.default_rng(2)
    cls_in = np.ones(8)
    feats = [_synthetic(20, 24, 40, rng=rng, cls=cls_in, name="a"),
             _synthetic(30, 20, 40, rng=rng, cls=cls_in + 0.1, name="b"),
             _synthetic(10, 10, 50, rng=rng, cls=-cls_in, name="odd")]
    assert find_outliers(torch.stack([f.cls for f in feats]), 0.7).tolist() == [True, True, False]
    res = cosegment_features(feats, CosegConfig(remove_outliers=True, **FAST))
    assert res.inliers.tolist() == [True, True, False]
    assert not res.masks[2].any() and (res.labels[2] == -1).all()
    assert _iou(res.masks[0], _truth(20, 24, 40)) > 0.95
    with pytest.raises(DensevitError, match="CLS"):
        cosegment_features([_synthetic(20, 24, 40), _synthetic(20, 24, 40)], CosegConfig(remove_outliers=True))


def test_grabcut_falls_back_when_it_cannot_run():
    img = np.zeros((40, 40, 3), np.uint8)
    empty = np.zeros((40, 40), bool)
    out, applied = grabcut_refine(img, empty)
    assert not applied and not out.any()
    full = np.ones((40, 40), bool)
    out, applied = grabcut_refine(img, full)
    assert not applied and out.all()


def test_token_maps_follow_the_token_grid():
    grid = TokenGrid(8, 4, (24, 32), (48, 64))                               # 5 x 7 tokens, original 2x
    vals = np.arange(grid.num_tokens)
    full = tokens_to_image(vals, grid)
    assert full.shape == (48, 64)
    centres = grid.token_centers().numpy()
    # the pixel under each token centre carries that token's value
    assert np.array_equal(full[centres[:, 1].astype(int), centres[:, 0].astype(int)], vals)


# ------------------------------------------------------------------ reference saliency, up-sampling, GrabCut
def test_strided_pass_is_an_extractor_at_that_stride_and_restores(make_extractor, pil_images):
    ext4, ext8 = make_extractor(4), make_extractor(8)
    x, _ = ext8.preprocess(pil_images[0], 40)
    d4 = ext4.extract_descriptors(x)
    s = ext4.extract_saliency_maps(x, stride=8)                 # the stride of the call, the same model
    torch.testing.assert_close(s, ext8.extract_saliency_maps(x))
    assert ext4.stride == 4 and ext4.model.patch_embed.proj.stride == (8, 8)   # the model is never changed
    torch.testing.assert_close(ext4.extract_descriptors(x), d4)
    with pytest.raises(DensevitError, match="divide"):
        ext4.extract_saliency_maps(x, stride=3)


def test_reference_saliency_is_the_half_size_stride8_map_on_the_descriptor_grid(make_extractor, pil_images):
    ext4, ext8 = make_extractor(4), make_extractor(8)
    img = pil_images[0]
    _, grid, _ = ext4.preprocess_with_image(img, LOAD)
    sal = ext4.reference_saliency(img, grid, LOAD).numpy().reshape(grid.shape)
    H, W = grid.input_hw
    x8, g8, _ = ext8.preprocess_with_image(img.resize((W // 2, H // 2), Image.LANCZOS), None)
    s8 = ext8.extract_saliency_maps(x8)[0].numpy().reshape(g8.shape)
    # a nearest resize: every row / column of the descriptor grid repeats one row / column of the small map,
    # in order, and every one of them is used
    def source(lines, small):  # the line of the small map holding every value of each line of sal
        return [int(np.argmin([np.abs(v[:, None] - u[None]).min(1).max() for u in small])) for v in lines]

    rows, cols = source(sal, s8), source(sal.T, s8.T)
    assert np.allclose(sal, s8[np.ix_(rows, cols)], atol=1e-6)
    assert rows == sorted(rows) and set(rows) == set(range(g8.shape[0])) and set(cols) == set(range(g8.shape[1]))
    assert g8.shape[0] < grid.shape[0] // 3                                  # stride 8 on half the size


def test_mask_upsampling_reference_is_uniform_token_centre_follows_the_centres():
    grid = TokenGrid(8, 4, (128, 170), (128, 170))                           # 31 x 41 tokens
    h, w = grid.shape
    rows = np.zeros((h, w), bool)
    counts = {}
    for how in ("reference", "token-centre"):
        per_row = []
        for r in range(h):
            rows[:] = False
            rows[r] = True
            per_row.append(int(mask_to_input(rows, grid, how)[:, 0].sum()))
        counts[how] = per_row
        assert sum(per_row) == 128                                           # a partition of the pixel rows
    assert set(counts["reference"]) <= {128 // h, 128 // h + 1}              # nearest resize: even spread
    assert counts["token-centre"][0] == 6 and counts["token-centre"][-1] == 6  # centres at 4, 8, ..., 124
    with pytest.raises(DensevitError, match="up-sampling"):
        CosegConfig(upsample_masks="bilinear").validate()


def test_grabcut_stream_is_seeded_once_per_set_and_deterministic():
    import cv2

    rng = np.random.default_rng(3)
    feats = [_synthetic(*b, rng=rng) for b in [(20, 24, 40), (40, 30, 36), (10, 10, 50)]]
    cfg = CosegConfig(**FAST)
    first = cosegment_features(feats, cfg)
    cv2.setRNGSeed(12345)                                                    # whatever the generator's state
    cv2.randu(np.zeros(7), 0, 1)
    again = cosegment_features(feats, cfg)
    for a, b in zip(first.masks, again.masks):
        assert np.array_equal(a, b)
    assert all(first.grabcut_applied)
    with pytest.raises(DensevitError, match="seeding"):
        CosegConfig(grabcut_seeding="never").validate()
