"""Extractor behaviour beyond the golden cases: one pass, early stop, layouts, batching, dtypes, binning."""
import pytest
import torch
import torch.nn.functional as F

from densevit import DensevitError, ViTExtractor
from densevit.features.binning import log_bin
from densevit.features.extractor import interpolate_pos_embed


@pytest.fixture(scope="module")
def ext(make_extractor):
    return make_extractor(4)


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 61, 75, generator=g)  # sizes not divisible by the patch or stride


def count_blocks(ext, fn):
    calls = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, a: calls.append(1)) for b in ext.model.blocks]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def test_grid_for_any_size(ext, x):
    feats = ext.extract(x, (3,), ("key",))
    assert feats.grid.shape == (1 + (61 - 8) // 4, 1 + (75 - 8) // 4)
    assert feats.descriptors[(3, "key")].shape == (2, 14 * 17, 384)


def test_several_layers_and_facets_in_one_pass_equal_separate_passes(ext, x):
    feats = ext.extract(x, (2, 7), ("key", "value", "token"))
    for (layer, facet), d in feats.descriptors.items():
        torch.testing.assert_close(d, ext.extract_descriptors(x, layer, facet), rtol=1e-4, atol=1e-5)


def test_forward_stops_after_deepest_layer(ext, x):
    assert count_blocks(ext, lambda: ext.extract(x, (1, 4), ("key",))) == 5
    assert count_blocks(ext, lambda: ext.extract(x, (4,), ("key",), saliency=True)) == 12  # saliency: last layer


def test_include_cls_and_attention_facet(ext, x):
    feats = ext.extract(x, (5,), ("token", "attn"), include_cls=True)
    T = feats.grid.num_tokens
    tok, attn = feats.descriptors[(5, "token")], feats.descriptors[(5, "attn")]
    assert tok.shape == (2, T + 1, 384)
    assert attn.shape == (2, 6, T + 1, T + 1)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6, T + 1))
    no_cls = ext.extract_descriptors(x, 5, "token")
    torch.testing.assert_close(tok[:, 1:], no_cls, rtol=1e-4, atol=1e-5)


def test_token_norm_is_final_norm_of_token(ext, x):
    feats = ext.extract(x, (11,), ("token", "token_norm"))
    with torch.inference_mode():
        normed = ext.model.norm(feats.descriptors[(11, "token")])
    torch.testing.assert_close(feats.descriptors[(11, "token_norm")], normed)


def test_batch_equals_single_images(ext, x):
    batch = ext.extract(x, (9,), ("key",), saliency=True)
    for i in range(2):
        one = ext.extract(x[i:i + 1], (9,), ("key",), saliency=True)
        torch.testing.assert_close(batch.descriptors[(9, "key")][i], one.descriptors[(9, "key")][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch.saliency[i], one.saliency[0], rtol=1e-4, atol=1e-4)


def test_saliency_range(ext, x):
    s = ext.extract_saliency_maps(x)
    assert s.shape == (2, ext.grid((61, 75)).num_tokens)
    assert torch.allclose(s.min(1).values, torch.zeros(2)) and torch.allclose(s.max(1).values, torch.ones(2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(make_extractor, x, dtype):
    ref = make_extractor(8).extract_descriptors(x, 9, "key", bin=True)
    low = make_extractor(8, dtype).extract_descriptors(x, 9, "key", bin=True)
    assert low.dtype == getattr(torch, dtype)
    assert F.cosine_similarity(low.float(), ref, dim=-1).mean() > 0.99


def test_negative_layer_and_errors(ext, x):
    torch.testing.assert_close(ext.extract_descriptors(x, -1, "key"), ext.extract_descriptors(x, 11, "key"))
    with pytest.raises(DensevitError, match="out of range"):
        ext.extract(x, (12,), ("key",))
    with pytest.raises(DensevitError, match="facet"):
        ext.extract(x, (3,), ("keys",))
    with pytest.raises(DensevitError, match="binning"):
        ext.extract(x, (3,), ("key",), bin=True, include_cls=True)
    with pytest.raises(DensevitError, match="smaller than"):
        ext.extract(torch.zeros(1, 3, 5, 40), (3,), ("key",))


def test_stride_must_divide_patch(golden_path):
    with pytest.raises(DensevitError, match="does not divide"):
        ViTExtractor("dino_vits8", stride=3, weights=str(golden_path), device="cpu")


def reference_log_bin(x: torch.Tensor, hierarchy: int = 2) -> torch.Tensor:
    """The reference implementation's per-token loop (the test oracle): Bx C x h x w -> B x T x 17C."""
    B, C, h, w = x.shape
    pools = [F.avg_pool2d(x, 3 ** k, stride=1, padding=3 ** k // 2, count_include_pad=False) for k in range(hierarchy)]
    out = torch.zeros(B, C * (1 + 8 * hierarchy), h, w)
    for y in range(h):
        for xx in range(w):
            part = 0
            for k in range(hierarchy):
                ks = 3 ** k
                for i in range(y - ks, y + ks + 1, ks):
                    for j in range(xx - ks, xx + ks + 1, ks):
                        if i == y and j == xx and k != 0:
                            continue
                        ii, jj = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                        out[:, part * C:(part + 1) * C, y, xx] = pools[k][:, :, ii, jj]
                        part += 1
    return out.flatten(2).permute(0, 2, 1)


@pytest.mark.parametrize("hw", [(7, 9), (2, 3), (1, 1)])
def test_log_bin_matches_reference_loop(hw):
    x = torch.randn(2, 5, *hw, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_bin(x), reference_log_bin(x))


def test_pos_embed_native_grid_unchanged_and_interpolation_shape():
    pos = torch.randn(1, 28 * 28, 16)
    assert interpolate_pos_embed(pos, (28, 28)) is pos
    out = interpolate_pos_embed(pos, (55, 73))
    assert out.shape == (1, 55 * 73, 16)


def test_iter_extract_streams_the_same_descriptors(ext, x):
    layers = (2, -1)
    streamed = list(ext.iter_extract(x, layers, ("key", "attn")))
    assert [l for l, _ in streamed] == [2, 11]
    full = ext.extract(x, layers, ("key", "attn"))
    for (l, out), given in zip(streamed, layers):
        for f in ("key", "attn"):
            torch.testing.assert_close(out[f], full.descriptors[(given, f)])


def test_cls_descriptor_comes_with_binned_patches(ext, x):
    feats = ext.extract(x, (9,), ("key", "token"), bin=True)
    with_cls = ext.extract(x, (9,), ("key", "token"), include_cls=True)
    for f in ("key", "token"):
        torch.testing.assert_close(feats.cls[(9, f)], with_cls.descriptors[(9, f)][:, 0])
        assert feats.descriptors[(9, f)].shape[-1] == 17 * feats.cls[(9, f)].shape[-1]


@pytest.mark.parametrize("backbone, file, strides", [("dino_vits8", "vits8_random_fp16.pth", (4, 8)),
                                                     ("dinov3_vits16", "dinov3_vits16_random_official_fp16.pth",
                                                      (8, 16))])
def test_one_model_serves_every_stride(shared, backbone, file, strides):
    """Stride is an argument of the call: one extractor, alternating strides, gives exactly what an extractor
    built for each stride gives, and its model is left as it was."""
    from densevit import ViTExtractor

    w = str(shared / "golden" / file)
    one = ViTExtractor(backbone, stride=strides[0], weights=w, device="cpu")
    own = {s: ViTExtractor(backbone, stride=s, weights=w, device="cpu") for s in strides}
    p = one.spec.patch_size
    x = torch.randn(1, 3, 4 * p, 5 * p, generator=torch.Generator().manual_seed(1))
    for s in (*strides, *strides[::-1]):
        got = one.extract(x, (5, -1), ("key", "token"), saliency=True, stride=s)
        want = own[s].extract(x, (5, -1), ("key", "token"), saliency=True)
        assert got.grid.shape == want.grid.shape and got.grid.stride == s
        for k in want.descriptors:
            assert torch.equal(got.descriptors[k], want.descriptors[k]), (s, k)
        assert torch.equal(got.saliency, want.saliency)
        assert one.model.patch_embed.proj.stride == (p, p) and one.stride == strides[0]
