"""DINOv2 (registers) and DINOv3 (RoPE) against their official code: the shared fixture, loaded through the normal
weight loader from the official checkpoint layouts; RoPE coordinates with a finer stride; strict loading."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densevit import DensevitError, ViTExtractor, get_spec
from densevit.models.posenc import DINOV2_REG, ROPE, rope_coords, rope_rotate
from densevit.models.weights import load_weights_file, read_state_dict


@pytest.fixture(scope="module")
def fixture(shared):
    meta = json.loads((shared / "golden" / "official_v2v3_golden.json").read_text())
    return meta, np.load(shared / "golden" / "official_v2v3_golden.npz")


_built = {}


def official(shared, backbone: str, stride=None, dtype="float32") -> ViTExtractor:
    files = {"dinov2_vits14_reg": "dinov2_vits14_reg_random_official_fp16.pth",
             "dinov3_vits16": "dinov3_vits16_random_official_fp16.pth"}
    key = (backbone, stride, dtype)
    if key not in _built:
        _built[key] = ViTExtractor(backbone, stride=stride, weights=str(shared / "golden" / files[backbone]),
                                   device="cpu", dtype=dtype)
    return _built[key]


def min_cos(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(b).double()
    return F.cosine_similarity(a.double().reshape(b.shape), b, dim=-1).min().item()


@pytest.mark.parametrize("case", ["dinov2_vits14_reg_224x308", "dinov3_vits16_224x320"])
def test_reproduces_official_outputs(case, fixture, shared):
    meta, z = fixture
    m = meta[case]
    ext = official(shared, m["backbone"])
    assert ext.patch_size == m["patch_size"]
    x = torch.from_numpy(z[f"{case}/input"])[None]
    assert list(x.shape[-2:]) == m["input_hw"]
    blocks = list(m["blocks"])
    feats = ext.extract(x, blocks, ("token", "token_norm"))
    for b in blocks:
        assert min_cos(feats.descriptors[(b, "token")][0], z[f"{case}/block{b}_patch"]) >= 0.99999, b
        assert min_cos(feats.cls[(b, "token")][0], z[f"{case}/block{b}_cls"]) >= 0.99999, b
    last = blocks[-1]
    assert min_cos(feats.descriptors[(last, "token_norm")][0], z[f"{case}/final_norm_patch"]) >= 0.99999
    assert min_cos(feats.cls[(last, "token_norm")][0], z[f"{case}/final_norm_cls"]) >= 0.99999


def test_each_backbone_declares_its_position_resampling():
    assert get_spec("dinov2_vits14_reg").pos == DINOV2_REG and get_spec("dinov2_vitb14_reg").pos == DINOV2_REG
    assert get_spec("dinov2_vits14").pos.offset == 0.1 and not get_spec("dinov2_vits14").pos.antialias
    assert get_spec("dino_vits8").pos.resample == "scale"
    for name in ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16_sat"):
        assert get_spec(name).pos == ROPE and get_spec(name).family == "eva"


def test_register_model_resampling_differs_from_dino_rule(fixture, shared):
    """The antialiased size-based resize is what makes the register model match; DINO's +0.1 rule does not."""
    meta, z = fixture
    case = "dinov2_vits14_reg_224x308"
    ext = official(shared, "dinov2_vits14_reg")
    x = torch.from_numpy(z[f"{case}/input"])[None]
    wrong = ViTExtractor("dinov2_vits14_reg", weights=str(shared / "golden" / meta[case]["weights"]), device="cpu")
    wrong.adapter.pos = get_spec("dinov2_vits14").pos
    got = wrong.extract(x, (11,), ("token_norm",)).descriptors[(11, "token_norm")][0]
    assert min_cos(got, z[f"{case}/final_norm_patch"]) < 0.999
    assert ext.adapter.pos == DINOV2_REG


@pytest.mark.parametrize("hw", [(224, 320), (200, 333), (48, 112)])
def test_rope_coords_official_at_patch_stride_and_subset_at_half(hw):
    p = 16
    H, W = hw[0] // p, hw[1] // p
    official = torch.stack(torch.meshgrid(torch.arange(0.5, H) / H, torch.arange(0.5, W) / W, indexing="ij"), -1)
    official = 2 * official.reshape(-1, 2) - 1
    torch.testing.assert_close(rope_coords(hw, p, p), official)
    for s in (8, 4):
        fine = rope_coords(hw, p, s)
        h, w = 1 + (hw[0] - p) // s, 1 + (hw[1] - p) // s
        k = p // s
        sub = fine.reshape(h, w, 2)[::k, ::k][:H, :W].reshape(-1, 2)
        torch.testing.assert_close(sub, official)


def test_dinov3_every_facet_strides_and_batches(shared):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 96, generator=g)
    facets = ("key", "query", "value", "token", "token_norm", "attn", "key_rope", "query_rope")
    for stride in (16, 8, 4):
        ext = official(shared, "dinov3_vits16", stride)
        feats = ext.extract(x, (3, 11), facets, saliency=True)
        h, w = feats.grid.shape
        assert (h, w) == (1 + (64 - 16) // stride, 1 + (96 - 16) // stride)
        T = h * w
        for f in facets:
            d = feats.descriptors[(11, f)]
            assert d.shape == ((2, 6, T, T) if f == "attn" else (2, T, 384)), f
            assert torch.isfinite(d).all()
        assert feats.saliency.shape == (2, T)
        binned = ext.extract(x, (9,), ("key",), bin=True).descriptors[(9, "key")]
        assert binned.shape == (2, T, 17 * 384)
        one = ext.extract(x[1:], (3, 11), ("key", "token"))
        torch.testing.assert_close(one.descriptors[(11, "token")][0], feats.descriptors[(11, "token")][1],
                                   rtol=1e-4, atol=1e-4)


def test_key_rope_is_the_rotated_key(shared):
    ext = official(shared, "dinov3_vits16", 8)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    feats = ext.extract(x, (5,), ("key", "key_rope"), include_cls=True)
    k, kr = feats.descriptors[(5, "key")], feats.descriptors[(5, "key_rope")]
    # prefix: CLS kept first here; storage tokens dropped. The CLS key is never rotated.
    torch.testing.assert_close(k[:, 0], kr[:, 0])
    assert not torch.allclose(k[:, 1:], kr[:, 1:])
    # head-minor layout back to B x heads x T x d, rotate, compare
    heads = ext.num_heads
    as_heads = k[:, 1:].reshape(1, -1, 64, heads).permute(0, 3, 1, 2)
    sincos = ext.adapter.rope((64, 80), torch.device("cpu"))
    rotated = rope_rotate(as_heads, sincos, 0).permute(0, 2, 3, 1).flatten(2)
    torch.testing.assert_close(rotated, kr[:, 1:], rtol=1e-5, atol=1e-5)
    # same norm: a rotation
    torch.testing.assert_close(as_heads.norm(dim=-1), rotated.reshape(1, -1, 64, heads).norm(dim=2).permute(0, 2, 1))


def test_key_and_key_rope_equal_without_rope(make_extractor):
    ext = make_extractor(8)
    x = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    feats = ext.extract(x, (4,), ("key", "key_rope", "query", "query_rope"))
    torch.testing.assert_close(feats.descriptors[(4, "key")], feats.descriptors[(4, "key_rope")])
    torch.testing.assert_close(feats.descriptors[(4, "query")], feats.descriptors[(4, "query_rope")])


@pytest.mark.parametrize("backbone,file", [("dinov2_vits14_reg", "dinov2_vits14_reg_random_official_fp16.pth"),
                                           ("dinov3_vits16", "dinov3_vits16_random_official_fp16.pth")])
def test_weights_loaded_after_construction_are_used(backbone, file, shared):
    """Positions are read from the model when used: no stale copy from construction time."""
    path = shared / "golden" / file
    ref = official(shared, backbone)
    late = ViTExtractor(backbone, weights="random", device="cpu")
    x = torch.randn(1, 3, 112, 160, generator=torch.Generator().manual_seed(3))
    before = late.extract(x, (11,), ("token_norm",)).descriptors[(11, "token_norm")]
    load_weights_file(late.model, late.spec, path)
    after = late.extract(x, (11,), ("token_norm",)).descriptors[(11, "token_norm")]
    want = ref.extract(x, (11,), ("token_norm",)).descriptors[(11, "token_norm")]
    assert not torch.allclose(before, want)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_loader_never_drops_a_tensor(shared, tmp_path):
    path = shared / "golden" / "dinov3_vits16_random_official_fp16.pth"
    # timm's plain model has no q/v bias: the official biases must not be dropped without a word
    plain = dataclasses.replace(get_spec("dinov3_vits16"), timm_arch="vit_small_patch16_dinov3")
    from densevit.models.weights import create_model

    with pytest.raises(DensevitError, match="q_bias"):
        load_weights_file(create_model(plain), plain, path)
    sd = read_state_dict(path)
    sd["blocks.0.attn.extra"] = torch.ones(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(DensevitError, match="unexpected key 'blocks.0.attn.extra'"):
        ViTExtractor("dinov3_vits16", weights=str(tmp_path / "extra.pth"), device="cpu")
    sd["blocks.0.attn.extra"] = torch.zeros(3)                      # an all-zero leftover is harmless
    torch.save(sd, tmp_path / "zero.pth")
    ViTExtractor("dinov3_vits16", weights=str(tmp_path / "zero.pth"), device="cpu")
    sd = read_state_dict(path)
    sd["blocks.0.attn.qkv.bias_mask"] = torch.ones_like(sd["blocks.0.attn.qkv.bias_mask"])  # k bias now used
    torch.save(sd, tmp_path / "kbias.pth")
    with pytest.raises(DensevitError, match="key bias"):
        ViTExtractor("dinov3_vits16", weights=str(tmp_path / "kbias.pth"), device="cpu")


def test_rope_periods_come_from_the_checkpoint(shared, tmp_path):
    path = shared / "golden" / "dinov3_vits16_random_official_fp16.pth"
    sd = read_state_dict(path)
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.5
    torch.save(sd, tmp_path / "p.pth")
    ext = ViTExtractor("dinov3_vits16", weights=str(tmp_path / "p.pth"), device="cpu", dtype="bfloat16")
    torch.testing.assert_close(ext.model.rope.periods, sd["rope_embed.periods"].float())
    assert ext.model.rope.periods.dtype == torch.float32


@pytest.mark.parametrize("backbone,stride", [("dinov2_vits14_reg", 7), ("dinov3_vits16", 8)])
def test_attention_inputs_give_the_attn_rows(backbone, stride, shared):
    """One token's attention from ``attention_inputs`` (registers in the softmax, keys after RoPE) is its row of
    the ``attn`` facet; the un-rotated ``key`` facet would not give it on DINOv3."""
    from densevit.features import similarity as sim

    ext = official(shared, backbone, stride)
    x = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(3))
    attn = ext.extract(x, (4,), ("attn",)).descriptors[(4, "attn")][0]            # heads x T x T (patches)
    q, k, scale = ext.attention_inputs(x, (4,))[4]
    P = ext.num_prefix_tokens
    assert P == 5 and q.shape[1] == k.shape[1] == P + attn.shape[-1]
    for t in (0, 13, attn.shape[-1] - 1):
        row = sim.query_attention(q[0, P + t], k[0], ext.num_heads, scale)
        torch.testing.assert_close(row[:, P:], attn[:, t].float(), atol=1e-6, rtol=1e-4)
    if backbone == "dinov3_vits16":
        f = ext.extract(x, (4,), ("query", "key"), include_cls=True).descriptors
        unrotated = sim.query_attention(f[(4, "query")][0, 1 + 13], f[(4, "key")][0], ext.num_heads, scale)
        assert (unrotated[:, 1:] - attn[:, 13].float()).abs().max() > 1e-3
