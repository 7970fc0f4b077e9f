"""Conformance with the reference implementations (DINO ViT + dino-vit-features) on fixed random weights."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densevit.io.images import preprocess
from densevit.models.registry import IMAGENET_MEAN, IMAGENET_STD

CASES = {"cat_s4": 4, "ibex_s4": 4, "cat_s8": 8, "ibex_s8": 8}
FACET_KEYS = {"key_l11": (11, "key"), "token_l11": (11, "token"), "query_l5": (5, "query"), "value_l3": (3, "value")}


def min_cosine(a: torch.Tensor, b: np.ndarray) -> float:
    return F.cosine_similarity(a.double(), torch.from_numpy(b).double(), dim=-1).min().item()


@pytest.mark.parametrize("case", CASES)
def test_descriptors_match_reference(case, golden, make_extractor):
    ext = make_extractor(CASES[case])
    x = torch.from_numpy(golden[f"{case}/input"])[None]
    wanted = {k: v for k, v in FACET_KEYS.items() if f"{case}/{k}" in golden.files}
    layers = sorted({l for l, _ in wanted.values()})
    facets = sorted({f for _, f in wanted.values()})
    feats = ext.extract(x, layers, facets, saliency=f"{case}/saliency" in golden.files)
    h, w = feats.grid.shape
    assert h * w == golden[f"{case}/token_l11"].shape[0]
    for key, (layer, facet) in wanted.items():
        got = feats.descriptors[(layer, facet)][0]
        assert got.shape == golden[f"{case}/{key}"].shape, key
        assert min_cosine(got, golden[f"{case}/{key}"]) >= 0.99999, key
    if feats.saliency is not None:
        np.testing.assert_allclose(feats.saliency[0].numpy(), golden[f"{case}/saliency"], atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("s4")])
def test_binned_descriptors_match_reference(case, golden, make_extractor):
    ext = make_extractor(CASES[case])
    x = torch.from_numpy(golden[f"{case}/input"])[None]
    got = ext.extract_descriptors(x, layer=9, facet="key", bin=True)[0]
    assert got.shape[1] == 17 * 384
    idx = torch.from_numpy(golden[f"{case}/key_l9_bin_idx"])
    assert min_cosine(got[idx], golden[f"{case}/key_l9_bin"]) >= 0.99999


@pytest.mark.parametrize("case", ["cat_s4", "ibex_s4"])
def test_preprocessing_reproduces_stored_input(case, golden, shared):
    meta = json.loads((shared / "golden" / "extractor_golden.json").read_text())["cases"][case]
    x, resized, _ = preprocess(shared / "data" / "images" / meta["image"], meta["load_size"], IMAGENET_MEAN, IMAGENET_STD)
    assert list(x.shape[-2:]) == meta["input_hw"]
    np.testing.assert_allclose(x.numpy(), golden[f"{case}/input"], atol=1e-6)


def test_end_to_end_from_image_file(golden, shared, make_extractor):
    ext = make_extractor(4)
    x, grid = ext.preprocess(shared / "data" / "images" / "ibex.jpg", 160)
    assert grid.shape == (39, 39) and grid.image_hw == (2751, 2686)
    desc = ext.extract_descriptors(x, 11, "key")[0]
    assert min_cosine(desc, golden["ibex_s4/key_l11"]) >= 0.99999
