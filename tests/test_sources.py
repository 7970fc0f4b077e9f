"""One interface for the model and the store (FeatureSource), one image reader (files and images in memory by the
same rules, each input decoded once by the set commands), one pixel grid for token maps (TokenGrid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from densevit.apps.cli import pca as pca_cli
from densevit.apps.coseg import CosegConfig, cosegment
from PIL import Image

import densevit.io.images as images_mod
from densevit.features.source import FeatureSource, ImageFeatures
from densevit.io.images import as_pil, decode_once, load_image
from densevit.models.grid import TokenGrid


def test_extractor_and_store_are_feature_sources(make_extractor, tmp_path):
    ext = make_extractor(8)
    assert isinstance(ext, FeatureSource) and ext.runs_model
    from densevit.storage.store import FeatureStore

    assert FeatureStore.runs_model is False and callable(FeatureStore.image_features)
    assert callable(FeatureStore.select)


class _Counting:
    """A user's own feature source: wraps the extractor and counts the images it is asked for. Apps take any
    object with the FeatureSource interface; none asks which kind it holds."""

    runs_model = True

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.patch_size, self.spec, self.device = inner.patch_size, inner.spec, inner.device

    def resolve_layer(self, layer: int) -> int:
        return self.inner.resolve_layer(layer)

    def image_features(self, image, load_size, layer, facet, **kw) -> ImageFeatures:
        self.calls += 1
        return self.inner.image_features(image, load_size, layer, facet, **kw)

    def extract_saliency_maps(self, x, stride=None):       # the reference's low-resolution saliency pass
        return self.inner.extract_saliency_maps(x, stride=stride)

    def frames_features(self, frames, rule, layers, facets, **kw):
        for batch in self.inner.frames_features(frames, rule, layers, facets, **kw):
            self.calls += len(batch.names)
            yield batch


def test_an_app_runs_on_any_feature_source(make_extractor, images):
    ext = make_extractor(8)
    cfg = CosegConfig(load_size=64, thresh=0.4, grabcut=False, saliency_source="same-pass")
    ref = cosegment(ext, images, cfg)
    src = _Counting(ext)
    assert isinstance(src, FeatureSource)
    got = cosegment(src, images, cfg)
    assert src.calls == len(images)
    for a, b in zip(ref.masks, got.masks):
        np.testing.assert_array_equal(a, b)


def test_images_in_memory_follow_the_file_rules(tmp_path, make_extractor):
    """A 16-bit image and an EXIF-rotated JPEG give the same pixels (and descriptors) from memory as from file."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, (40, 56)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    for name in ("deep.png", "rot.jpg"):
        from_file = load_image(tmp_path / name)
        in_memory = as_pil(Image.open(tmp_path / name))
        assert in_memory.size == from_file.size
        np.testing.assert_array_equal(np.asarray(in_memory), np.asarray(from_file))
    ext = make_extractor(8)
    a = ext.image_features(tmp_path / "deep.png", 32, 11, "key", saliency=False)
    b = ext.image_features(Image.open(tmp_path / "deep.png"), 32, 11, "key", saliency=False)
    assert torch.equal(a.descriptors, b.descriptors)
    from densevit.apps.common import (
        extract_features,  # the apps' path (it used .convert("RGB"))
    )

    c = extract_features(ext, Image.open(tmp_path / "deep.png"), 32, 11, "key", saliency=False)
    assert torch.equal(a.descriptors, c.descriptors)
    with pytest.raises(ValueError, match="HxWx4"):
        as_pil(np.zeros((4, 4, 5), np.uint8))


def test_decode_once_reads_each_unchanged_file_once(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    opened = []
    real = images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", lambda p: opened.append(p) or real(p))
    with decode_once():
        images_mod.check_readable(tmp_path / "a.png")
        first = load_image(tmp_path / "a.png")
        assert load_image(tmp_path / "a.png") is first
    assert len(opened) == 1
    load_image(tmp_path / "a.png")                       # outside the scope: read again
    assert len(opened) == 2
    with decode_once():
        load_image(tmp_path / "a.png")
        Image.fromarray(np.full((20, 31, 3), 9, np.uint8)).save(tmp_path / "a.png")   # changed: read again
        assert load_image(tmp_path / "a.png").size == (31, 20)
    assert len(opened) == 4


def test_set_commands_decode_each_image_once(tmp_path, images, golden_path, monkeypatch):
    """densevit-pca checks every input and extracts it: each file is opened once (it was twice)."""
    from PIL import Image as PILImage

    small = []
    for i, p in enumerate(images):
        small.append(tmp_path / f"in{i}.png")
        load_image(p).resize((96, 72)).save(small[-1])
    opened = []
    real = images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", lambda p: opened.append(str(p)) or real(p))
    code = pca_cli.entry([*map(str, small), "-o", str(tmp_path / "out"), "--weights", str(golden_path),
                          "--load-size", "64", "--device", "cpu", "--quiet"])
    assert code == 0
    assert sorted(opened) == sorted(map(str, small))
    assert PILImage.open(tmp_path / "out" / "in0_pca.png").size[0] > 0


def test_token_grid_maps_pixels_to_the_nearest_token_and_samples_between_centres():
    grid = TokenGrid(8, 4, (36, 44), (54, 66))          # resized 36x44 from a 54x66 image, stride 4
    h, w = grid.shape
    rows, cols = grid.pixel_tokens()
    centres = grid.token_centers()                       # Tx2 (x, y) in original pixels
    ys, xs = torch.meshgrid(torch.arange(54) + 0.5, torch.arange(66) + 0.5, indexing="ij")
    # every pixel column / row takes a nearest token centre of its axis (an exact tie may go either way)
    for got, pix, ctr in ((cols, torch.arange(66) + 0.5, centres[:w, 0]), (rows, torch.arange(54) + 0.5,
                                                                           centres[::w, 1])):
        dist = (pix[:, None] - ctr[None]).abs()
        assert (dist.gather(1, got[:, None]).squeeze(1) <= dist.min(1).values + 1e-9).all()
    assert rows.shape == (54,) and cols.shape == (66,) and h * w == grid.num_tokens
    # bilinear sampling reproduces a map linear in x and y inside the hull of the token centres
    cx, cy = centres[:, 0], centres[:, 1]
    up = grid.upsample((2 * cx + 3 * cy).float())
    inside = (xs >= cx.min()) & (xs <= cx.max()) & (ys >= cy.min()) & (ys <= cy.max())
    assert torch.allclose(up[inside], (2 * xs + 3 * ys).float()[inside], atol=1e-3)
    two = grid.upsample(torch.stack([cx, cy]).float(), out_hw=(27, 33))
    assert two.shape == (2, 27, 33)


def _small_frames(tmp_path, n=3):
    from densevit.io.paths import shared_dir

    seq = shared_dir() / "data" / "davis2016" / "JPEGImages" / "480p" / "blackswan"
    out = []
    for i in range(n):
        out.append(tmp_path / "frames" / f"{i:05d}.png")
        out[-1].parent.mkdir(exist_ok=True)
        load_image(seq / f"{i:05d}.jpg").resize((96, 72)).save(out[-1])
    return out


def test_vos_and_discovery_run_on_any_feature_source(make_extractor, tmp_path):
    """Video propagation, the crw and dino point protocols and object discovery read features through
    FeatureSource.frames_features: a user's own source gives the extractor's masks, frame for frame."""
    from densevit.apps.discovery.core import DiscoverConfig, discover_mask
    from densevit.apps.propagation import CRWConfig, crw_features
    from densevit.apps.vos import VOSConfig, propagate

    ext = make_extractor(8)
    frames = _small_frames(tmp_path)
    first = np.zeros((72, 96), np.uint8)
    first[20:50, 30:70] = 1
    cfg = VOSConfig(short_side=64, batch_size=2)
    ref = list(propagate(ext, frames, first, cfg))
    src = _Counting(ext)
    got = list(propagate(src, frames, first, cfg))
    assert src.calls == len(frames) and len(got) == len(ref) == len(frames)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    ccfg = CRWConfig(crop_size=64, batch_size=2)
    for a, b in zip(crw_features(ext, frames, ccfg), crw_features(src, frames, ccfg)):
        assert torch.equal(a, b)
    for fit in ("pad", "round", "crop"):
        dcfg = DiscoverConfig(load_size=64, fit=fit)
        np.testing.assert_array_equal(discover_mask(ext, frames[0], dcfg), discover_mask(src, frames[0], dcfg))


def test_a_store_feeds_discovery_and_refuses_what_it_does_not_hold(make_extractor, golden_path, tmp_path):
    """A store serves discovery at its own load size (fit="crop": the same mask as the model) and refuses, in one
    line, DINO's video resize, zero padding and the upsamplers' guide (the network input it does not keep)."""
    from densevit.apps.discovery.core import DiscoverConfig, discover_mask
    from densevit.apps.vos import VOSConfig, propagate
    from densevit.cli.extract import entry as extract_entry
    from densevit.errors import DensevitError
    from densevit.storage.store import FeatureStore, StoreError

    frames = _small_frames(tmp_path, 2)
    st = tmp_path / "store"
    assert extract_entry([str(frames[0].parent), "--store", str(st), "--weights", str(golden_path), "--stride", "8",
                          "--load-size", "64", "--layer", "-1", "--quiet", "--workers", "0", "--store-dtype",
                          "float32", "--device", "cpu"]) == 0
    store, ext = FeatureStore(st), make_extractor(8)
    assert isinstance(store, FeatureSource)
    cfg = DiscoverConfig(load_size=64, fit="crop")
    for frame in frames:
        np.testing.assert_array_equal(discover_mask(store, frame, cfg), discover_mask(ext, frame, cfg))
    for bad, what in ((DiscoverConfig(load_size=64), "zero-padded"), (DiscoverConfig(load_size=32, fit="crop"),
                                                                      "shorter side to 32"),
                      (DiscoverConfig(load_size=64, fit="crop", upsample="bilinear"), "network input")):
        with pytest.raises(StoreError, match=what) as err:
            discover_mask(store, frames[0], bad)
        assert "\n" not in str(err.value)
    first = np.zeros((72, 96), np.uint8)
    first[20:50, 30:70] = 1
    with pytest.raises(StoreError, match="OpenCV bilinear"):
        next(propagate(store, frames, first, VOSConfig(short_side=64)))
    from densevit.apps.propagation import CRWConfig, propagate_soft

    with pytest.raises(DensevitError, match="crw protocol"):
        next(propagate_soft(store, frames, torch.zeros(8, 8, 2), CRWConfig(crop_size=64)))
    from densevit.features.frames import InputRule

    own = InputRule("short_side", 64)
    for kw, what in (({"attention": True}, "attention inputs"), ({"stride": 4}, "stride 8, not 4"),
                     ({"saliency": True}, "no saliency maps")):
        with pytest.raises(StoreError, match=what):
            next(store.frames_features(frames, own, (-1,), ("key",), **kw))
    b = next(store.frames_features(frames[:1], own, (-1,), ("key",)))
    m = next(ext.frames_features(frames[:1], own, (-1,), ("key",), saliency=True, attention=True))
    assert b.grid == m.grid and b.descriptors[(-1, "key")].shape == m.descriptors[(-1, "key")].shape
    assert m.saliency.shape == (1, m.grid.num_tokens) and m.attention[-1][0].shape[1] == m.grid.num_tokens + 1
    # the patch index's query reads an in-store image through the same call, without its pixels (file gone)
    key = store.key(frames[1])
    frames[1].unlink()
    f = store.image_features(key, None, -1, "key", saliency=False, pixels=False)
    assert f.image is None and torch.equal(f.descriptors, store.descriptors(key, -1, "key"))
    assert f.grid == store.grid(key)
