"""The explorer's computations (densevit.features.similarity, densevit.apps.explore) with the golden random weights:
similarity maps peak at the clicked token, identical and shifted copies match where they should, best buddies
agree with the index, one query's attention equals the attn facet, and bad input gives one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from densevit.apps.explore.session import Explorer, Settings
from PIL import Image

from densevit.errors import DensevitError
from densevit.features import similarity as sim
from densevit.matching import knn as index

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture()
def make(make_extractor, golden_path):
    """``make(stride=8, load_size=112, **kw)`` -> a new Explorer on the cached golden extractor."""
    def build(stride: int = 8, load_size: int = 112, **kw) -> Explorer:
        return Explorer(extractor=make_extractor(stride), weights=str(golden_path), load_size=load_size, **kw)

    return build


def test_similarity_map_peaks_at_the_token_itself(make, noise_pair):
    a, _ = noise_pair
    ex = make()
    ex.add_image(a, "a")
    for s in (Settings(layer=11, stride=8, load_size=112), Settings(layer=4, facet="value", bin=True, stride=8,
                                                                    load_size=112)):
        d = ex.descriptors(0, s)
        assert torch.allclose(d.norm(dim=1), torch.ones(d.shape[0]), atol=1e-5)
        for t in (0, 37, d.shape[0] - 1):
            m = sim.similarity_map(d[t], d)
            assert int(m.argmax()) == t and m[t] == pytest.approx(1.0, abs=1e-5)


def test_identical_images_match_at_the_clicked_position(make, noise_pair):
    a, _ = noise_pair
    ex = make()
    ex.add_image(a, "a")
    ex.add_image(a.copy(), "copy")
    s = Settings(layer=9, bin=True, stride=8, load_size=112)
    for x, y in [(10.0, 10.0), (70.3, 50.9), (140.0, 105.0)]:
        r = ex.similarity(0, x, y, s, k=3)
        assert r.maps[1].topk[0].token == r.clicked.token
        assert (r.maps[1].topk[0].x, r.maps[1].topk[0].y) == (r.clicked.x, r.clicked.y)
        assert r.maps[1].best_buddy is not None and r.maps[1].best_buddy.token == r.clicked.token
        near = set(sim.overlapping_tokens(ex.grid(0, s), r.clicked.token).tolist())
        assert r.clicked.token in near and not near & {m.token for m in r.maps[0].topk}   # left out in its image
        assert r.maps[0].values[r.clicked.token] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("stride,load_size,shift", [(8, 112, 16), (4, 56, 16)])
def test_shifted_copy_matches_shifted_by_the_same_tokens(make, noise_pair, stride, load_size, shift):
    a, b = noise_pair                                    # b's content = a's content moved right by 16 pixels
    ex = make(stride, load_size)
    ex.add_image(a, "a")
    ex.add_image(b, "b")
    g = ex.grid(0)
    tokens_shift = shift * g.input_hw[1] / g.original_hw[1] / stride
    assert tokens_shift == int(tokens_shift) >= 1                   # the shift is whole tokens at this stride
    checked = 0
    for layer, bin in [(11, False), (9, True), (0, False)]:
        s = ex.settings(layer=layer, bin=bin)
        for x in np.linspace(shift + 2, 143 - shift, 5):
            for y in np.linspace(2, 109, 4):
                r = ex.similarity(0, float(x), float(y), s, k=1)
                top = r.maps[1].topk[0]
                rows, cols = g.unflat(torch.tensor([r.clicked.token, top.token]))
                if int(cols[0]) + tokens_shift >= g.shape[1]:
                    continue
                assert int(rows[1]) == int(rows[0])
                assert abs(int(cols[1]) - (int(cols[0]) + tokens_shift)) <= 1
                checked += 1
    assert checked >= 30


def test_best_buddy_agrees_with_the_index(make, noise_pair):
    a, b = noise_pair
    ex = make()
    ex.add_image(a, "a")
    ex.add_image(b.transpose(Image.FLIP_LEFT_RIGHT), "b")
    s = Settings(layer=11, stride=8, load_size=112)
    da, db = ex.descriptors(0, s), ex.descriptors(1, s)
    ia, ib = index.best_buddies(da, db, backend="torch")
    pairs = dict(zip(ia.tolist(), ib.tolist()))
    for t in range(da.shape[0]):
        assert sim.best_buddy(t, da, db) == pairs.get(t)


def test_query_attention_equals_the_attn_facet(make_extractor, noise_pair):
    ext = make_extractor(8)
    a, _ = noise_pair
    x, grid = ext.preprocess(a, load_size=112)
    f = ext.extract(x, (2, 11), ("attn",), include_cls=True)
    qk = ext.attention_inputs(x, (2, 11))
    for layer in (2, 11):
        attn = f.descriptors[(layer, "attn")][0]
        q, k, scale = qk[layer][0][0], qk[layer][1][0], qk[layer][2]
        for t in (0, 1, 57, q.shape[0] - 1):                 # 0 is the CLS query
            row = sim.query_attention(q[t], k, ext.num_heads, scale)
            assert row.shape == attn[:, t].shape
            torch.testing.assert_close(row, attn[:, t].float(), atol=1e-6, rtol=1e-4)


def test_explorer_attention_and_saliency(make, noise_pair):
    a, _ = noise_pair
    ex = make()
    ex.add_image(a, "a")
    s = Settings(layer=5, stride=8, load_size=112)
    mean = ex.attention(0, 30.0, 40.0, s, head=None, k=4)
    assert float(mean.map.values.sum()) + mean.cls_share == pytest.approx(1.0, abs=1e-5)
    heads = [ex.attention(0, 30.0, 40.0, s, head=h) for h in range(ex.num_heads)]
    torch.testing.assert_close(torch.stack([h.map.values for h in heads]).mean(0), mean.map.values)
    assert len(mean.map.topk) == 4 and mean.map.topk[0].score == pytest.approx(float(mean.map.values.max()))
    with pytest.raises(DensevitError, match="head 6 out of range"):
        ex.attention(0, 30.0, 40.0, s, head=6)
    sal = ex.saliency(0, s)
    assert sal.values.shape == (sal.grid.num_tokens,) and float(sal.values.min()) == 0 and float(sal.values.max()) == 1
    pics = ex.pca(s, max_side=64)
    assert pics[0].shape[2] == 3 and max(pics[0].shape[:2]) == 64 and pics[0].dtype == np.uint8


def test_binned_descriptors_equal_the_extractor(make_extractor, make, noise_pair):
    a, _ = noise_pair
    ex = make()
    ex.add_image(a, "a")
    ext = make_extractor(8)
    x, _ = ext.preprocess(a, load_size=112)
    want = sim.normalize(ext.extract_descriptors(x, layer=7, facet="query", bin=True)[0])
    torch.testing.assert_close(ex.descriptors(0, Settings(layer=7, facet="query", bin=True, stride=8,
                                                          load_size=112)), want, atol=1e-6, rtol=1e-5)


def test_overlapping_tokens_and_topk_exclusion():
    from densevit.models.grid import TokenGrid

    g = TokenGrid(8, 4, (40, 48))                                   # 9 x 11 tokens, patches overlap 1 step
    t = int(g.flat(torch.tensor([4]), torch.tensor([5]))[0])
    near = sim.overlapping_tokens(g, t)
    assert sorted(near.tolist()) == sorted(int(g.flat(torch.tensor([r]), torch.tensor([c]))[0])
                                           for r in (3, 4, 5) for c in (4, 5, 6))
    assert sim.overlapping_tokens(g, 0).tolist() == [0, 1, 11, 12]   # clipped at the corner
    assert sim.overlapping_tokens(TokenGrid(8, 8, (40, 48)), 7).tolist() == [7]
    scores = torch.arange(g.num_tokens, dtype=torch.float32)
    v, i = sim.topk_tokens(scores, 3, exclude=sim.overlapping_tokens(g, g.num_tokens - 1))
    assert i.tolist() == [96, 95, 94] and v.tolist() == [96.0, 95.0, 94.0]  # 97, 98 and the row above dropped
    assert sim.topk_tokens(scores[:3], 5, exclude=1)[1].tolist() == [2, 0]


def test_grid_extent_and_upsampled_map_line_up_with_token_centres():
    from densevit.models.grid import TokenGrid

    g = TokenGrid(8, 4, (40, 48), (80, 96))                      # 9 x 11 tokens, original twice the input
    x0, y0, x1, y1 = sim.grid_extent(g)
    assert (x0, y0) == (4.0, 4.0) and (x1, y1) == (92.0, 76.0)     # cells of 4 input px = 8 original px
    h, w = g.shape
    v = torch.arange(g.num_tokens, dtype=torch.float32)            # = w * row + col: bilinear reproduces it
    up = sim.upsample_map(v, g)
    assert up.shape == (80, 96)
    gx = (((torch.arange(96) + 0.5) / 2 - 4) / 4).clamp(0, w - 1)   # pixel centre -> grid column (clamped)
    gy = (((torch.arange(80) + 0.5) / 2 - 4) / 4).clamp(0, h - 1)
    torch.testing.assert_close(up, w * gy[:, None] + gx[None, :], atol=1e-4, rtol=0)
    half = sim.upsample_map(v, g, out_hw=(40, 48))                  # the same image at half the size
    assert half.shape == (40, 48) and float(half[0, 0]) == 0.0 and float(half[-1, -1]) == float(v[-1])


def test_bad_input_gives_one_line_errors(make, tmp_path):
    ex = make(max_side=200)
    with pytest.raises(DensevitError, match=r"cannot read image broken\.jpg") as info:
        ex.add_image(b"\xff\xd8\xff\xe0 not an image", name="broken.jpg")
    assert "\n" not in str(info.value)
    big = Image.new("RGB", (400, 300), (200, 100, 50))
    item = ex.add_image(big, "big")
    assert item.image.size == (200, 150) and "resized to 200x150" in item.note
    g = ex.grid(0, Settings(stride=8, load_size=112))
    assert g.original_hw == (300, 400)                                # coordinates stay in original pixels
    with pytest.raises(DensevitError, match=r"point \(400\.0, 10\.0\) is outside the image \(400x300"):
        ex.similarity(0, 400.0, 10.0, Settings(stride=8, load_size=112))
    with pytest.raises(DensevitError, match="stride 3 is not offered"):
        ex.settings(stride=3)
    with pytest.raises(DensevitError, match="unknown facet"):
        ex.settings(facet="attn")


def test_saved_finding_replays_from_the_command_line(make, noise_pair, tmp_path, golden_path):
    a, b = noise_pair
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    a.save(pa)
    b.save(pb)
    ex = make()
    ex.add_image(pa)
    ex.add_image(pb)
    rec = ex.finding(ex.similarity(0, 60.0, 50.0, Settings(layer=10, stride=8, load_size=112), k=2))
    assert rec["clicked"]["image"] == 0 and len(rec["matches"]) == 2 and len(rec["matches"][1]["topk"]) == 2
    (tmp_path / "f.json").write_text(json.dumps(rec))
    out = subprocess.run([sys.executable, "-m", "densevit.apps.cli.explore", "--replay", str(tmp_path / "f.json"),
                          "--weights", str(golden_path), "--device", "cpu"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["matches"] == rec["matches"] and got["clicked"] == rec["clicked"]


def test_cli_missing_weights_is_one_line(tmp_path, noise_pair):
    a, _ = noise_pair
    a.save(tmp_path / "a.png")
    env = {**os.environ, "DENSEVIT_WEIGHTS": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "densevit.apps.cli.explore", str(tmp_path / "a.png"),
                          "--backbone", "dino_vitb16", "--port", "0"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densevit-explore: error:") and "weights" in lines[0]


def test_one_model_serves_every_stride(make, make_extractor, noise_pair):
    """The explorer keeps one extractor per backbone: each stride is an argument of its calls, with the same
    descriptors as an extractor built for that stride."""
    from densevit.apps.explore import Settings

    ex = make(stride=8)
    ex.add_image(noise_pair[0])
    assert ex.extractor(4) is ex.extractor(8)
    for stride in (4, 8, 4):
        s = Settings(layer=9, facet="key", stride=stride, load_size=64)
        d = ex.descriptors(0, s)
        own = make(stride=stride)
        own.add_image(noise_pair[0])
        assert torch.equal(d, own.descriptors(0, s)) and ex.grid(0, s).stride == stride
    assert ex.extractor(8).model.patch_embed.proj.stride == (8, 8)


def test_upsampled_descriptors_are_one_per_pixel_from_the_patch_stride(make, noise_pair):
    a, b = noise_pair
    ex = make(stride=4)
    ex.add_image(a, "a")
    ex.add_image(b, "b")
    s = ex.settings(layer=9, stride=4, upsample="jbu")
    assert s.stride == 8                                          # upsampled from the patch stride
    g = ex.grid(0, s)
    assert g.shape == (112, 144) and ex.descriptors(0, s).shape == (112 * 144, 384)
    r = ex.similarity(0, 60.0, 50.0, s, k=3)
    assert abs(r.maps[1].topk[0].x - (r.clicked.x + 16)) <= 8 and abs(r.maps[1].topk[0].y - r.clicked.y) <= 8
    with pytest.raises(DensevitError, match="do not combine"):
        ex.settings(bin=True, upsample="jbu")
    with pytest.raises(DensevitError, match="unknown upsampler"):
        ex.settings(upsample="nearest")
