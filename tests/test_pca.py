"""Descriptor PCA and its RGB picture: real images with the golden random weights (shapes, ranges,
determinism) and constructed descriptors with a known first component."""
import numpy as np
import pytest
import torch
from densevit.apps.draw import pca_rgb
from densevit.apps.pca import descriptor_pca, pca_features
from PIL import Image

from densevit.errors import DensevitError
from densevit.models.grid import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_real_images_components_rgb_and_determinism(make_extractor, images):
    small = [Image.open(p).convert("RGB") for p in images]
    small = [im.resize((im.width // 8, im.height // 8), Image.BILINEAR) for im in small]
    ext = make_extractor(4)
    r1 = descriptor_pca(ext, small, load_size=64)
    r2 = descriptor_pca(ext, small, load_size=64)
    for img, a, b in zip(small, r1, r2):
        h, w = a.grid.shape
        assert a.components.shape == (h, w, 4) and a.components.dtype == np.float32
        np.testing.assert_array_equal(a.components, b.components)
        assert np.all(np.diff(a.explained) <= 0) and 0 < a.explained.sum() <= 1
        pic = pca_rgb(a.components, a.grid, max_side=None)
        assert pic.shape == (img.height, img.width, 3) and pic.dtype == np.uint8
        assert pic.min() == 0 and pic.max() == 255                       # each channel min-max scaled
    # one PCA for the set: both images share the explained-variance ratios; per image they differ
    np.testing.assert_array_equal(r1[0].explained, r1[1].explained)
    per = descriptor_pca(ext, small, load_size=64, all_together=False)
    assert not np.array_equal(per[0].explained, per[1].explained)


def test_first_component_separates_two_groups_of_descriptors():
    grid = TokenGrid(8, 4, (40, 40), (80, 80))                           # 9 x 9 tokens, original twice
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.05, (grid.num_tokens, 12)).astype(np.float32)
    left = grid.token_centers().numpy()[:, 0] < 40
    d[left, :] += 3.0
    res = pca_features([torch.from_numpy(d)], [grid], ["syn"], n_components=3)[0]
    first = res.components[..., 0].reshape(-1)
    assert (np.sign(first[left]) != np.sign(first[~left].mean())).all()
    assert res.explained[0] > 0.9
    pic = pca_rgb(res.components, grid, rgb=(0, 1, 2), max_side=None)
    assert pic.shape == (80, 80, 3)
    assert len({tuple(pic[40, 5]), tuple(pic[40, 75])}) == 2                # left and right differ in colour
    shown = pca_rgb(res.components, grid, rgb=(0, 1, 2), max_side=40)
    assert shown.shape == (40, 40, 3)


def test_bad_component_count_is_a_user_error():
    grid = TokenGrid(8, 8, (16, 16))
    with pytest.raises(DensevitError):
        pca_features([torch.zeros(4, 3)], [grid], ["x"], n_components=0)
    with pytest.raises(DensevitError):
        pca_features([torch.randn(4, 3)], [grid], ["x"], n_components=5)
