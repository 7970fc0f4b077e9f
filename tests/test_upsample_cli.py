"""--upsample in the commands: pixel-dense maps from the patch stride (extract, coseg, partseg), the store's raw
maps upsampled at read time, and one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from densevit.apps.cli import coseg, partseg
from densevit.cli import extract
from densevit.features.upsampled import UpsampledSource
from densevit.io.images import load_image


@pytest.fixture(scope="module")
def small(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("small")
    out = []
    for i, p in enumerate(images):
        out.append(d / f"im{i}.png")
        load_image(p).resize((80, 64)).save(out[-1])
    return out


def _model(golden_path):
    return ["--weights", str(golden_path), "--load-size", "64", "--device", "cpu"]


def test_extract_upsample_writes_one_descriptor_per_input_pixel(tmp_path, small, golden_path, capsys):
    assert extract.entry([str(small[0]), "-o", str(tmp_path / "o"), *_model(golden_path), "--upsample", "jbu",
                          "--saliency"]) == 0
    z = np.load(tmp_path / "o" / "im0.npz")
    H, W = z["input_hw"]
    assert (H, W) == (64, 80) and z["descriptors"].shape == (H * W, 384) and z["saliency"].shape == (H * W,)
    assert tuple(z["num_patches"]) == (H, W) and int(z["stride"]) == 1 and int(z["extraction_stride"]) == 8
    assert str(z["upsample"]) == "jbu"
    code = extract.entry([str(small[0]), "--store", str(tmp_path / "s"), *_model(golden_path), "--upsample", "jbu"])
    assert code == 2 and "store keeps the raw patch-stride maps" in capsys.readouterr().err


def test_upsampled_source_equals_the_extractors_own_upsampling(make_extractor, small):
    ext = make_extractor(8)
    src = UpsampledSource(ext, "bilinear")
    f = src.image_features(small[0], 64, 11, "key", saliency=True)
    assert f.grid.shape == (64, 80) and f.descriptors.shape == (64 * 80, 384) and f.saliency.shape == (64 * 80,)
    x, grid = ext.preprocess(small[0], 64)
    direct = ext.extract(x, (11,), ("key",), image_hw=grid.image_hw, upsample="bilinear")
    assert torch.allclose(f.descriptors, direct.descriptors[(11, "key")][0], atol=1e-5)


@pytest.mark.parametrize("app,kind", [(coseg, "mask"), (partseg, "parts")])
def test_set_commands_segment_at_pixel_resolution(app, kind, tmp_path, small, golden_path):
    out = tmp_path / "o"
    flags = ["--thresh", "0.4", "--saliency-source", "same-pass", "--upsample", "jbu", "--quiet"]
    if app is coseg:
        flags.append("--no-grabcut")
    else:
        flags += ["--crf", "none", "--num-parts", "2"]
    assert app.entry([*map(str, small), "-o", str(out), *_model(golden_path), *flags]) == 0
    from PIL import Image

    for i in range(2):
        m = np.asarray(Image.open(out / f"im{i}_{kind}.png"))
        assert m.shape == (64, 80)            # original size (the inputs are 80x64)
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] and "timings" in summary


def test_a_stores_raw_maps_are_upsampled_at_read_time(tmp_path, small, golden_path):
    store = tmp_path / "s"
    assert extract.entry([*map(str, small), "--store", str(store), *_model(golden_path), "--stride", "8",
                          "--saliency", "--quiet"]) == 0
    out = tmp_path / "o"
    assert coseg.entry([*map(str, small), "-o", str(out), "--store", str(store), "--saliency-source", "same-pass",
                        "--upsample", "jbu", "--no-grabcut", "--thresh", "0.4", "--quiet"]) == 0
    from densevit.storage.store import FeatureStore

    st = FeatureStore(store)
    f = UpsampledSource(st, "jbu").image_features(small[0], None, 11, "key")
    assert f.grid.shape == (64, 80) and st.grid(small[0]).shape == (8, 10)     # stored raw, upsampled on read


def test_discover_runs_on_a_denser_upsampled_grid(tmp_path, small, golden_path):
    import json

    from densevit.apps.cli import discover

    out = tmp_path / "o"
    common = [str(small[1]), "--backbone", "dino_vits8", "--weights", str(golden_path), "--load-size", "64",
              "--device", "cpu", "--quiet"]
    assert discover.entry([*common, "-o", str(tmp_path / "plain")]) == 0
    assert discover.entry([*common, "-o", str(out), "--upsample", "jbu", "--max-tokens", "1500"]) == 0
    plain = json.loads((tmp_path / "plain" / "boxes.json").read_text())["images"]["im1"]
    dense = json.loads((out / "boxes.json").read_text())["images"]["im1"]
    h, w = plain["grid_hw"]
    assert dense["grid_hw"] == [4 * h, 4 * w]                 # f = 4: the densest within 1500 tokens (8 x 10 x 16)
    from PIL import Image

    assert np.asarray(Image.open(out / "im1_mask.png")).shape == (64, 80)
    code = discover.entry([*common, "-o", str(tmp_path / "bad"), "--upsample", "jbu", "--stride", "4"])
    assert code == 1                                            # one line for the image, the run goes on


def test_vos_propagates_on_upsampled_features(golden_path, tmp_path):
    """A textured square moving right: tracked on the 2x denser upsampled grid as on the patch grid, and the
    command takes --upsample."""
    from densevit import ViTExtractor
    from densevit.apps.cli import vos as vos_cli
    from densevit.apps.vos import VOSConfig, dense_grid, propagate
    from densevit.eval.metrics.davis import db_eval_iou
    from PIL import Image

    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    tex = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    frames, masks = [], []
    for i in range(4):
        f, m = bg.copy(), np.zeros((96, 128), np.uint8)
        f[32:64, 16 + 8 * i:48 + 8 * i], m[32:64, 16 + 8 * i:48 + 8 * i] = tex, 1
        frames.append(f)
        masks.append(m)
    ext = ViTExtractor("dino_vits8", weights=str(golden_path), device="cpu")
    cfg = VOSConfig(short_side=96, multiple=8, upsample="bilinear")
    grid = ext.grid((96, 128), (96, 128))
    assert dense_grid(grid, 2).shape == (2 * grid.shape[0], 2 * grid.shape[1])
    out = list(propagate(ext, frames, masks[0], cfg))
    assert min(db_eval_iou(masks[i] == 1, out[i] == 1) for i in range(1, 4)) >= 0.7
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:05d}.png")
    Image.fromarray(masks[0] * 255).save(tmp_path / "m.png")
    assert vos_cli.entry(["--frames", str(d), "--first-mask", str(tmp_path / "m.png"), "-o", str(tmp_path / "o"),
                          "--weights", str(golden_path), "--device", "cpu", "--short-side", "96", "--multiple", "8",
                          "--upsample", "jbu", "--quiet"]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 4


@pytest.mark.parametrize("method", ["bilinear", "jbu"])
def test_several_maps_of_one_image_upsample_as_one(method):
    """Channel-wise methods upsample the descriptors and the saliency of an image in one call (Upsample Anything
    then fits its kernels once): the same maps as one call per map."""
    from densevit.models.grid import TokenGrid
    from densevit.upsample import CHANNELWISE, upsample_token_maps, upsample_tokens

    g = torch.Generator().manual_seed(0)
    grid = TokenGrid(8, 8, (40, 48))
    guide = torch.rand(1, 3, 40, 48, generator=g)
    maps = [torch.randn(1, grid.num_tokens, 6, generator=g), torch.rand(1, grid.num_tokens, 1, generator=g)]
    together, out_grid = upsample_token_maps(maps, grid, guide, method)
    assert method in CHANNELWISE and out_grid.shape == (40, 48)
    for m, t in zip(maps, together):
        assert torch.allclose(t, upsample_tokens(m, grid, guide, method)[0], atol=1e-5)
