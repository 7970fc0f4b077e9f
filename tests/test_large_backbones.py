"""The large DINOv2 / DINOv3 backbones against their official code (facebookresearch/dinov2 at b8931f7,
facebookresearch/dinov3 at 6876159, hub builders with ``pretrained=False``), on random weights.

The weights cannot ship (ViT-g has 1.1B parameters), so each test generates them: ``tests/official_random.py``
turns the official model's key -> shape table (``fixtures/large_backbones.json``) and a seed into an
official-layout state dict by a documented rule; the test saves it under the official file name and builds
densevit's model through the normal loader (official-layout conversion, strict). ``fixtures/large_backbones.npz``
holds what the official model computes on exactly those weights (float32) for a ``randn`` input of
``input_hw`` (``torch.Generator().manual_seed(input_seed)``), stored as float16: the patch and CLS tokens of a
middle and the last block (``get_intermediate_layers(norm=False)``), the key projection of the middle block
(hook on ``attn.qkv``, heads-major) and ``forward_features``' normed patch / CLS tokens.

ViT-L, ViT-g (with and without registers) and ViT-H+ are proven whole. ViT-7B (6.7B parameters, 27 GB in
float32) does not fit this machine: the same code path is proven on the official ``dinov3_vit7b16`` builder with
``depth=2`` (its own arguments passed on to ``_make_dinov3_vit`` with only ``depth`` replaced) at full width (every other setting, and so every tensor shape of a block, as the official 7B: no
q / k / v bias, SwiGLU aligned to 64, untied local CLS norm, layer scale, RoPE base 100, 4 storage tokens),
loaded into timm's ``vit_7b_patch16_dinov3`` with ``depth=2`` by the same converter; the full 40-block registry
entry, loader and conversion are checked on the meta device (every official key maps, every shape agrees).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import timm
import torch.nn.functional as F

from densevit import ViTExtractor, get_spec
from densevit.models.families import make_adapter
from densevit.models.weights import _fit_state_dict, create_model, load_weights_file
from official_random import official_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "large_backbones.json").read_text())


@pytest.fixture(scope="module")
def expected():
    return np.load(FIXTURES / "large_backbones.npz")


def min_cos(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(b.astype(np.float64))
    return F.cosine_similarity(a.double().reshape(b.shape), b, dim=-1).min().item()


def official_file(case: str, tmp_path: Path, name: str) -> Path:
    m = META[case]
    path = tmp_path / name
    torch.save(official_state_dict(m["shapes"], m["seed"], m["head_dim"]), path)   # float16, loaded as float32
    return path


def check(ext: ViTExtractor, case: str, expected) -> dict:
    """Every shipped official output against densevit's facets; returns the minimum per-token cosines."""
    m = META[case]
    x = torch.randn(1, 3, *m["input_hw"], generator=torch.Generator().manual_seed(m["input_seed"]))
    mid, last = m["blocks"]
    feats = ext.extract(x, (mid, last), ("token", "key", "token_norm"))
    heads = ext.num_heads
    key = feats.descriptors[(mid, "key")][0]                               # T x (d * heads), head-minor
    key = key.reshape(key.shape[0], -1, heads).transpose(1, 2).reshape(key.shape[0], -1)
    cos = {f"block{b}_patch": min_cos(feats.descriptors[(b, "token")][0], expected[f"{case}/block{b}_patch"])
           for b in (mid, last)}
    cos.update({f"block{b}_cls": min_cos(feats.cls[(b, "token")][0], expected[f"{case}/block{b}_cls"])
                for b in (mid, last)})
    cos[f"block{mid}_key"] = min_cos(key, expected[f"{case}/block{mid}_key"])
    cos["final_norm_patch"] = min_cos(feats.descriptors[(last, "token_norm")][0], expected[f"{case}/final_norm_patch"])
    cos["final_norm_cls"] = min_cos(feats.cls[(last, "token_norm")][0], expected[f"{case}/final_norm_cls"])
    assert min(cos.values()) >= 0.99999, cos
    return cos


@pytest.mark.parametrize("name", ["dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vitg14", "dinov2_vitg14_reg",
                                  "dinov3_vith16plus"])
def test_large_backbone_equals_official(name, tmp_path, expected):
    spec = get_spec(name)
    path = official_file(name, tmp_path, spec.weight_files[0])
    ext = ViTExtractor(name, weights=str(path), device="cpu")
    path.unlink()
    assert (ext.depth, ext.num_heads, ext.model.embed_dim) == (spec.depth, spec.num_heads, spec.embed_dim)
    check(ext, name, expected)


def test_vit7b_code_path_on_two_official_blocks(tmp_path, expected):
    """ViT-7B at full width with 2 blocks (the official builder's every other setting; see the module docstring),
    loaded by the normal loader into timm's 7B architecture with ``depth=2`` and run as an own model."""
    case, spec = "dinov3_vit7b16_2blocks", get_spec("dinov3_vit7b16")
    path = official_file(case, tmp_path, spec.weight_files[0])
    with torch.device("meta"):
        model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=0, depth=2)
    load_weights_file(model, spec, path)
    path.unlink()
    ext = ViTExtractor("dinov3_vit7b16", model=model, device="cpu")
    assert (ext.depth, ext.num_heads, ext.model.embed_dim, ext.num_prefix_tokens) == (2, 32, 4096, 5)
    assert ext.model.blocks[0].attn.q_bias is None and type(ext.model.blocks[0].mlp).__name__ == "SwiGLU"
    check(ext, case, expected)


def test_vit7b_registry_entry_loader_and_conversion_on_meta():
    """The full 40-block ViT-7B: every official key maps onto the registry's model with its shape, on the meta
    device (nothing allocated, nothing computed); the adapter accepts its blocks."""
    spec = get_spec("dinov3_vit7b16")
    assert spec.weight_files[0] == "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"
    model = create_model(spec, "meta")
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0],
            model.num_prefix_tokens) == (spec.depth, spec.embed_dim, spec.num_heads, spec.patch_size, 5)
    official = {k: torch.empty(s, device="meta") for k, s in META["dinov3_vit7b16"]["shapes"].items()}
    sd, extras = _fit_state_dict(official, model, spec, "the official 7B layout")
    expected = model.state_dict()
    assert sd.keys() == expected.keys()
    assert all(sd[k].shape == expected[k].shape for k in sd)
    assert extras["rope.periods"].shape == model.rope.periods.shape
    unused = set(official) - {"rope_embed.periods"} - {k.replace(".gamma_1", ".ls1.gamma").replace(
        ".gamma_2", ".ls2.gamma").replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.").replace(
        ".mlp.fc2.", ".mlp.w3.").replace("reg_token", "storage_tokens") for k in sd}
    assert unused == {"mask_token", "local_cls_norm.weight", "local_cls_norm.bias"}
    model.load_state_dict(sd, strict=True, assign=True)
    make_adapter(spec.family, model, spec.pos, spec.patch_size, spec.patch_size)   # SwiGLU blocks accepted


def test_adapter_rejects_an_unknown_feed_forward():
    from densevit import DensevitError

    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    model.blocks[3].mlp = torch.nn.Identity()
    spec = get_spec("dinov2_vits14")
    with pytest.raises(DensevitError, match="Identity"):
        make_adapter(spec.family, model, spec.pos, 14, 14)


def test_large_entries_use_the_official_file_names():
    names = {n: get_spec(n).weight_files[0] for n in ("dinov2_vitl14", "dinov2_vitg14", "dinov2_vitl14_reg",
                                                    "dinov2_vitg14_reg", "dinov3_vith16plus")}
    assert names == {"dinov2_vitl14": "dinov2_vitl14_pretrain.pth", "dinov2_vitg14": "dinov2_vitg14_pretrain.pth",
                     "dinov2_vitl14_reg": "dinov2_vitl14_reg4_pretrain.pth",
                     "dinov2_vitg14_reg": "dinov2_vitg14_reg4_pretrain.pth",
                     "dinov3_vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"}
