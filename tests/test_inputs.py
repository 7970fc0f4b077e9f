"""What the extractor takes and how it behaves as a module: images in memory (arrays, tensors, PIL) by the rules
of files, lists of images of different sizes, ``forward``, ``output_fmt``, ``.to(device / dtype)``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevit import DensevitError, ViTExtractor
from densevit.io.images import as_pil

LOAD = 40


@pytest.fixture(scope="module")
def ext(make_extractor):
    return make_extractor(4)


@pytest.fixture(scope="module")
def small(shared, tmp_path_factory):
    """A small RGB photograph (the ibex, 1/16 size) saved as PNG, and its pixels."""
    with Image.open(shared / "data" / "images" / "ibex.jpg") as im:
        img = im.convert("RGB").resize((168, 172), Image.LANCZOS)
    path = tmp_path_factory.mktemp("inputs") / "ibex.png"
    img.save(path)
    return path, img


def test_every_kind_of_image_gives_the_files_input(ext, small):
    path, img = small
    arr = np.asarray(img)
    as_float = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255      # torchvision's ToTensor
    want, grid = ext.preprocess(path, LOAD)
    for image in (img, arr, torch.from_numpy(arr.copy()).permute(2, 0, 1), as_float, as_float[None],
                  arr.astype(np.float32) / 255):
        x, g = ext.preprocess(image, LOAD)
        assert torch.equal(x, want) and g.input_hw == grid.input_hw and g.image_hw == grid.image_hw


def test_batch_tensor_and_list(ext, small):
    path, img = small
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    x, grid = ext.preprocess(torch.stack([t, t.flip(-1)]), LOAD)
    assert x.shape[0] == 2 and torch.equal(x[0:1], ext.preprocess(path, LOAD)[0])
    assert torch.equal(x[1:2], ext.preprocess(img.transpose(Image.FLIP_LEFT_RIGHT), LOAD)[0])
    pairs = ext.preprocess([path, img.rotate(90, expand=True)], LOAD)
    assert [tuple(p[0].shape[-2:]) for p in pairs] == [tuple(x.shape[-2:]), tuple(x.shape[-2:])[::-1]]


def test_load_size_pair_is_the_size(ext, small):
    x, grid = ext.preprocess(small[1], (32, 56))
    assert tuple(x.shape[-2:]) == (32, 56) == grid.input_hw
    for bad in ((32,), (32, 0), 0):
        with pytest.raises(DensevitError):
            ext.preprocess(small[1], bad)


def test_in_memory_images_follow_the_rules_of_files(tmp_path):
    """EXIF orientation of an opened (not yet transposed) PIL image, alpha, greyscale and 16-bit arrays."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
    with Image.open(tmp_path / "r.png") as opened:
        assert opened.size == (30, 20)
        assert np.array_equal(np.asarray(as_pil(opened)), np.asarray(as_pil(tmp_path / "r.png")))
    assert as_pil(tmp_path / "r.png").size == (20, 30)
    rgba = rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(as_pil(rgba)), np.asarray(as_pil(tmp_path / "a.png")))
    grey16 = rng.integers(0, 65535, (20, 30)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    assert np.array_equal(np.asarray(as_pil(grey16)), np.asarray(as_pil(tmp_path / "g.png")))
    assert np.array_equal(np.asarray(as_pil(rgb[..., 0])), np.repeat(rgb[..., :1], 3, axis=2))


@pytest.mark.parametrize("bad, words", [(torch.rand(3, 8, 8) * 2 - 1, "in [0, 1]"), (np.zeros((3, 8, 8)), "HxW"),
                                        (torch.zeros(8, 8, 3), "3xHxW"), (np.zeros((8, 8, 3), np.int64), "uint8"),
                                        ("not a file.png", "no such image"), (3, "not an image")])
def test_what_is_not_an_image_is_one_line(bad, words):
    with pytest.raises(DensevitError) as err:
        as_pil(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_extract_takes_images_and_lists_in_input_order(ext, small):
    path, img = small
    wide = img.resize((220, 120), Image.LANCZOS)
    got = ext.extract([path, wide, np.asarray(img)], (3, 11), ("key",), saliency=True, load_size=LOAD)
    assert isinstance(got, list) and len(got) == 3
    alone = [ext.extract(*ext.preprocess(im, LOAD)[:1], (3, 11), ("key",), saliency=True) for im in (img, wide)]
    for g, a in zip(got, [alone[0], alone[1], alone[0]]):
        for k in a.descriptors:
            assert F.cosine_similarity(g.descriptors[k], a.descriptors[k], dim=-1).min() > 0.99999
        assert torch.allclose(g.saliency, a.saliency, atol=1e-5)
    assert got[1].grid.image_hw == (120, 220) and got[0].grid.image_hw == (172, 168)
    one = ext.extract(path, load_size=LOAD)                        # a single image: one Features, not a list
    assert torch.equal(one.descriptors[(11, "key")], got[0].descriptors[(11, "key")])


def test_model_input_is_unchanged_and_forward_is_extract(ext, small):
    x, grid = ext.preprocess(small[0], LOAD)
    f = ext.extract(x, (5,), ("value",))
    assert f.grid == ext.grid(tuple(x.shape[-2:]))
    assert torch.equal(ext.extract(x[0], (5,), ("value",)).descriptors[(5, "value")], f.descriptors[(5, "value")])
    assert torch.equal(ext(x, (5,), ("value",)).descriptors[(5, "value")], f.descriptors[(5, "value")])


def test_output_fmt_nchw(ext, small):
    x, grid = ext.preprocess(small[0], LOAD)
    tokens = ext.extract(x, (11,), ("key",), saliency=True)
    maps = ext.extract(x, (11,), ("key",), saliency=True, output_fmt="NCHW")
    h, w = grid.shape
    d = maps.descriptors[(11, "key")]
    assert d.shape == (1, 384, h, w) and maps.saliency.shape == (1, h, w)
    assert torch.equal(d.flatten(2).transpose(1, 2), tokens.descriptors[(11, "key")])
    assert torch.equal(maps.saliency.flatten(1), tokens.saliency)
    assert ext.extract(x, output_fmt="NHWC").descriptors[(11, "key")].shape == (1, h, w, 384)
    binned = ext.extract(x, (9,), ("key",), bin=True, output_fmt="NCHW").descriptors[(9, "key")]
    assert binned.shape == (1, 17 * 384, h, w)
    for kw in (dict(output_fmt="NCWH"), dict(output_fmt="NCHW", include_cls=True),
               dict(output_fmt="NCHW", facets=("attn",))):
        with pytest.raises(DensevitError):
            ext.extract(x, **kw)


def test_to_keeps_device_and_dtype(golden_path, small):
    ext = ViTExtractor("dino_vits8", stride=8, weights=str(golden_path), device="cpu")
    x, _ = ext.preprocess(small[0], LOAD)
    ref = ext.extract(x).descriptors[(11, "key")]
    assert ext.to(torch.bfloat16) is ext and ext.dtype == torch.bfloat16
    low = ext(x).descriptors[(11, "key")]
    assert low.dtype == torch.bfloat16 and F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.98
    ext.float()                                     # back to float32 (the weights keep bfloat16's rounding)
    back = ext(x).descriptors[(11, "key")]
    assert ext.dtype == torch.float32 and back.dtype == torch.float32
    assert F.cosine_similarity(back, ref, dim=-1).min() > 0.98
    ext.to(torch.device("meta"))
    assert ext.device.type == "meta" and next(ext.model.parameters()).device.type == "meta"
    with pytest.raises(DensevitError):
        ext.double()


def test_to_keeps_the_rotary_periods_exact():
    ext = ViTExtractor("dinov3_vits16", stride=8, weights="random", device="cpu")
    periods = ext.model.rope.periods.clone()
    ext.half()
    assert ext.dtype == torch.float16 and ext.model.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert ext.model.rope.periods.dtype == torch.float32 and torch.equal(ext.model.rope.periods, periods)
