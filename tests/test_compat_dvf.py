"""``densevit.compat.dvf.ViTExtractor`` is a drop-in for dino-vit-features' extractor.

Its outputs are compared with the golden fixture (``shared/golden/extractor_golden.npz``: the original
dino-vit-features extractor on DINO's ViT-S/8 with the golden random weights; see shared/README.md) through
the shim's public calls only. The scripts' use of it is exercised by the sequence of calls that
dino-vit-features' ``correspondences.py`` (``find_correspondences``) and ``cosegmentation.py`` /
``part_cosegmentation.py`` (``find_cosegmentation``, ``find_part_cosegmentation``) make on the extractor, at
ShirAmir/dino-vit-features commit 1779649078744e7d9be903325355fd481cca8103 (written here, not copied), with
the weights found as those scripts find them (no argument: the search, here ``$DENSEVIT_WEIGHTS`` holding the
golden file under DINO's official name), and compared with what densevit's own apps compute (apps/common.py,
apps/correspondence.py, whose outputs tests/test_app_conformance.py checks against the reference's).
The scripts themselves, run unchanged but for the import line, were checked outside the repository (README,
"Coming from dino-vit-features").
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevit import DensevitError
from densevit.apps.common import extract_set
from densevit.apps.correspondence import pair_features
from densevit.compat.dvf import MODEL_TYPES, ViTExtractor, backbone_of
from densevit.models.registry import IMAGENET_MEAN, INCEPTION_MEAN


def min_cosine(a: torch.Tensor, b) -> float:
    b = torch.from_numpy(b) if isinstance(b, np.ndarray) else b
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


@pytest.fixture(scope="module")
def shim(golden_path):
    return ViTExtractor("dino_vits8", stride=4, device="cpu", weights=golden_path)


def test_descriptors_and_saliency_are_the_originals(shim, golden, shared):
    assert shim.load_size is None and shim.num_patches is None
    batch, pil = shim.preprocess(shared / "data" / "images" / "ibex.jpg", 160)
    assert isinstance(pil, Image.Image) and pil.size == (160, 163)
    np.testing.assert_allclose(batch[0].numpy(), golden["ibex_s4/input"], atol=1e-6)
    for layer, facet, key in ((11, "key", "key_l11"), (5, "query", "query_l5"), (3, "value", "value_l3"),
                              (11, "token", "token_l11")):
        d = shim.extract_descriptors(batch, layer, facet)
        assert d.shape == (1, 1, 39 * 39, 384), facet
        assert min_cosine(d[0, 0], golden[f"ibex_s4/{key}"]) >= 0.99999, facet
    assert shim.num_patches == (39, 39) and shim.load_size == (163, 160)
    with_cls = shim.extract_descriptors(batch, 11, "key", include_cls=True)
    assert with_cls.shape == (1, 1, 39 * 39 + 1, 384)
    assert min_cosine(with_cls[0, 0, 1:], golden["ibex_s4/key_l11"]) >= 0.99999
    binned = shim.extract_descriptors(batch, 9, "key", bin=True)
    assert binned.shape == (1, 1, 39 * 39, 17 * 384)
    assert min_cosine(binned[0, 0, golden["ibex_s4/key_l9_bin_idx"]], golden["ibex_s4/key_l9_bin"]) >= 0.99999
    sal = shim.extract_saliency_maps(batch)
    assert sal.shape == (1, 39 * 39)
    np.testing.assert_allclose(sal[0].numpy(), golden["ibex_s4/saliency"], atol=1e-5)


def test_stride_8_token_facet(golden, golden_path):
    shim = ViTExtractor("dino_vits8", 8, device="cpu", weights=golden_path)
    d = shim.extract_descriptors(torch.from_numpy(golden["ibex_s8/input"])[None], 11, "token")
    assert shim.num_patches == (20, 20) and min_cosine(d[0, 0], golden["ibex_s8/token_l11"]) >= 0.99999


def test_attributes_and_names(shim):
    assert (shim.p, shim.stride, shim.model_type, shim.device) == (8, (4, 4), "dino_vits8", "cpu")
    assert shim.model is shim.extractor.model and isinstance(shim.model, torch.nn.Module)
    assert tuple(shim.mean) == IMAGENET_MEAN
    assert {k: backbone_of(k) for k in MODEL_TYPES} == MODEL_TYPES
    assert backbone_of("dinov2_vits14") == "dinov2_vits14"
    for bad in ("vit_base_patch8_224", "dino_resnet50"):
        with pytest.raises(DensevitError):
            backbone_of(bad)
    sup = ViTExtractor("vit_small_patch16_224", 8, device="cpu", weights="random")
    assert sup.extractor.spec.name == "sup_vits16" and tuple(sup.mean) == INCEPTION_MEAN and sup.p == 16


def test_errors_are_densevit_errors(shim):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(DensevitError):
        shim.extract_descriptors(x, 11, "attn")
    with pytest.raises(DensevitError):
        shim.extract_descriptors(x, 11, "key", bin=True, include_cls=True)


@pytest.fixture()
def found_weights(tmp_path, monkeypatch, golden_path):
    """The golden weights where the scripts' default search finds them: DINO's official file name."""
    (tmp_path / "dino_deitsmall8_pretrain.pth").symlink_to(golden_path)
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(tmp_path))


def test_the_correspondence_script_calls(found_weights, shared, make_extractor):
    """find_correspondences' calls: one extractor; per image preprocess, binned key descriptors of layer 9,
    num_patches / load_size read after each; then both saliency maps; p and stride for the points."""
    paths = [shared / "data" / "images" / n for n in ("cat.jpg", "ibex.jpg")]
    device, load = "cpu", 64
    extractor = ViTExtractor("dino_vits8", 4, device=device)
    got = []
    for path in paths:
        batch, pil = extractor.preprocess(path, load)
        desc = extractor.extract_descriptors(batch.to(device), 9, "key", True)
        got.append((batch, pil, desc, extractor.num_patches, extractor.load_size))
    sal = [extractor.extract_saliency_maps(b.to(device))[0] for b, *_ in got]
    fa, fb = pair_features(make_extractor(4), *paths, load, 9, "key", True, True)
    for (batch, pil, desc, num_patches, load_size), s, f in zip(got, sal, (fa, fb)):
        assert num_patches == f.grid.shape and load_size == f.grid.input_hw == (pil.height, pil.width)
        assert desc.shape == (1, 1, f.grid.num_tokens, 17 * 384)
        assert min_cosine(desc[0, 0], f.descriptors) >= 0.99999
        assert torch.allclose(s, f.saliency, atol=1e-5)
        mask = s > 0.05                                                  # the script's fg test and indexing
        assert desc[0, 0, mask, :].cpu().numpy().shape[0] == int(mask.sum())
    y = (torch.tensor(3) - 1) * extractor.stride[0] + extractor.stride[0] + extractor.p // 2
    assert int(y) == 3 * 4 + 4                                          # the token centre in resized pixels


def test_the_cosegmentation_script_calls(found_weights, shared, make_extractor):
    """find_(part_)cosegmentation's calls: a stride-4 extractor and a stride-8 one for the low-resolution
    saliency (input size: half the descriptor pass's, given as a pair); descriptors with include_cls."""
    paths = [shared / "data" / "images" / n for n in ("cat.jpg", "ibex.jpg")]
    device, load = "cpu", 64
    extractor = ViTExtractor("dino_vits8", 4, device=device)
    saliency_extractor = ViTExtractor("dino_vits8", stride=8, device=device)
    ext = make_extractor(4)
    ours = extract_set(ext, paths, load, 11, "key", saliency=False, include_cls=True)
    for path, f in zip(paths, ours):
        batch, pil = extractor.preprocess(path, load)
        descs = extractor.extract_descriptors(batch.to(device), 11, "key", False, True).cpu().numpy()
        num_patches, load_size = extractor.num_patches, extractor.load_size
        cls, descs = torch.from_numpy(descs[:, :, 0, :]), descs[:, :, 1:, :]
        assert min_cosine(torch.from_numpy(descs[0, 0]), f.descriptors) >= 0.99999
        assert min_cosine(cls[0, 0], f.cls) >= 0.99999
        low_batch, _ = saliency_extractor.preprocess(path, (load_size[0] // 2, load_size[1] // 2))
        sal = saliency_extractor.extract_saliency_maps(low_batch.to(device)).cpu().numpy()
        assert saliency_extractor.load_size == (load_size[0] // 2, load_size[1] // 2)
        up = Image.fromarray(sal.reshape(saliency_extractor.num_patches)).resize(num_patches[::-1], Image.NEAREST)
        want = ext.reference_saliency(f.image, f.grid, load).numpy()
        np.testing.assert_allclose(np.asarray(up).flatten(), want, atol=1e-5)


def test_returned_tensors_take_in_place_edits(shim):
    """The original's outputs are ordinary tensors; scripts edit them in place (e.g. ``unsqueeze_``)."""
    d = shim.extract_descriptors(torch.zeros(1, 3, 24, 24), 0, "token")
    d /= 2
    d.unsqueeze_(0)
    assert d.shape == (1, 1, 1, 25, 384)
