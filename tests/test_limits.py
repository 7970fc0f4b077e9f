"""Issue 31: bad weights are one line naming the file, upsamplers refuse bad arguments and stay bounded, and every
resource has one bound, stated before the work, with a flag to raise it (docs/limits.md)."""
from __future__ import annotations

import time

import pytest
import torch

from densevit.errors import DensevitError, InvalidArgumentError
from densevit.models.weights import load_backbone
from densevit.upsample import jbu, load_anyup, upsample


# ------------------------------------------------------------------------------------------------ weights files
@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory, golden_path):
    """Zero-byte, text, pickled-code and NaN checkpoints (the NaN one: the golden layout, every float NaN)."""
    d = tmp_path_factory.mktemp("weights")
    (d / "empty.pth").write_bytes(b"")
    (d / "text.pth").write_text("these are not weights\n")

    class Code:
        def __reduce__(self):
            return (print, ("code from a checkpoint ran",))

    torch.save({"a": Code()}, d / "pickled.pth")
    sd = torch.load(golden_path, weights_only=True)
    sd["blocks.3.attn.qkv.weight"] = sd["blocks.3.attn.qkv.weight"] * float("nan")
    torch.save(sd, d / "nan.pth")
    return d


@pytest.mark.parametrize("kind,words", [("empty", "empty (0 bytes)"), ("text", "not a PyTorch"),
                                        ("pickled", "pickles objects other than tensors"),
                                        ("nan", "non-finite values")])
def test_bad_weights_file_is_one_line_naming_it(bad_weights, kind, words):
    path = bad_weights / f"{kind}.pth"
    with pytest.raises(DensevitError) as got:
        load_backbone("dino_vits8", path)
    msg = str(got.value)
    assert str(path) in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["empty", "text", "pickled"])
def test_bad_anyup_weights_file_is_one_line_naming_it(bad_weights, kind):
    path = bad_weights / f"{kind}.pth"
    with pytest.raises(DensevitError) as got:
        load_anyup(str(path))
    assert str(path) in str(got.value) and "\n" not in str(got.value)


def test_nan_anyup_weights_are_refused(tmp_path):
    sd = load_anyup("random").state_dict()
    name = next(iter(sd))
    sd[name] = sd[name] * float("nan")
    torch.save(sd, tmp_path / "anyup_nan.pth")
    with pytest.raises(DensevitError, match="non-finite"):
        load_anyup(str(tmp_path / "anyup_nan.pth"))


# ------------------------------------------------------------------------------------------------ upsamplers
def test_jbu_window_is_clamped_to_the_feature_map():
    """sigma_spatial=50 on a 6x6 map took 22.6 s and 1.7 GB (a 201x201 window of cells, all but 6x6 outside the
    map); clamped, it is the same result as the widest window that fits."""
    torch.manual_seed(0)
    f, im = torch.randn(1, 8, 6, 6), torch.rand(1, 3, 48, 48)
    t = time.perf_counter()
    wide = upsample(f, im, "jbu", sigma_spatial=50)
    assert time.perf_counter() - t < 10         # was 22.6 s; a wide margin for a loaded machine
    fit = jbu(f, im, sigma_spatial=50, radius=5)
    assert torch.allclose(wide, fit)
    assert torch.isfinite(wide).all()


@pytest.mark.parametrize("kw", [{"sigma_spatial": float("nan")}, {"sigma_range": float("nan")},
                                {"sigma_spatial": float("inf")}, {"sigma_spatial": 0.0}])
def test_jbu_bad_sigma_is_invalid_argument(kw):
    with pytest.raises(InvalidArgumentError, match="sigma"):
        upsample(torch.randn(1, 4, 6, 6), torch.rand(1, 3, 24, 24), "jbu", **kw)


@pytest.mark.parametrize("method", ["bilinear", "jbu", "upsample_anything"])
@pytest.mark.parametrize("size", [(0, 0), (-4, 8), (8.5, 8)])
def test_bad_out_size_is_invalid_argument(method, size):
    with pytest.raises(InvalidArgumentError, match="out_size"):
        upsample(torch.randn(1, 4, 6, 6), torch.rand(1, 3, 24, 24), method, out_size=size)
    from densevit.upsample import UPSAMPLERS

    with pytest.raises(InvalidArgumentError, match="out_size"):
        UPSAMPLERS[method](torch.randn(1, 4, 6, 6), torch.rand(1, 3, 24, 24), size)


# ------------------------------------------------------------------------------------------------ index parameters
@pytest.mark.parametrize("kw,words", [({"kind": "hnsw", "hnsw_m": -3}, "--hnsw-m"), ({"kind": "hnsw", "hnsw_m": 0},
                                      "--hnsw-m"), ({"nlist": -1}, "--nlist"), ({"nlist": 0}, "--nlist"),
                                     ({"pq_m": 0}, "--pq-m"), ({"pq_m": -2}, "--pq-m"), ({"nprobe": 0}, "--nprobe")])
def test_index_parameters_zero_or_negative_are_refused(kw, words):
    from densevit.storage.patch_index import IndexConfig

    with pytest.raises(DensevitError, match=words):
        IndexConfig(**kw).check()


@pytest.mark.parametrize("kw,words", [({"kind": "ivf-flat", "nlist": 100_000}, "more lists than the 3,240"),
                                     ({"kind": "ivf-pq", "pq_m": 7}, "must divide the descriptor size 384"),
                                     ({"kind": "ivf-pq", "pq_m": 768}, "must divide")])
def test_index_parameters_checked_against_the_vectors(kw, words):
    from densevit.storage.patch_index import IndexConfig

    with pytest.raises(DensevitError, match=words):
        IndexConfig(**kw).check_sizes(3240, 384)
    IndexConfig(kind="ivf-flat", nlist=64).check_sizes(3240, 384)


def test_nprobe_past_the_lists_is_refused():
    from densevit.storage.patch_index import IndexConfig

    with pytest.raises(DensevitError, match="--nprobe 64 is more than the 16 lists"):
        IndexConfig(nprobe=64).check_nprobe(16)
    IndexConfig(nprobe=64).check_nprobe(None)


# ------------------------------------------------------------------------------------------------ output bytes
def test_extract_upsample_output_is_bounded_before_any_work(tmp_path, golden_path):
    """--upsample bilinear --load-size 512 on a 160x120 image wrote a 536 MB .npz; now refused from the header,
    naming the flag, before the model loads (a missing weights file is not even opened)."""
    from PIL import Image

    from densevit.cli.extract import entry

    Image.new("RGB", (160, 120), (10, 200, 30)).save(tmp_path / "small.png")
    args = [str(tmp_path / "small.png"), "-o", str(tmp_path / "out"), "--upsample", "bilinear", "--load-size", "512",
            "--weights", str(golden_path)]
    assert entry(args) == 2
    assert not (tmp_path / "out" / "small.npz").exists()
    assert entry(args + ["--load-size", "48", "--max-output-mib", "1"]) == 2
    assert entry(args + ["--load-size", "48", "--max-output-mib", "0"]) == 0
    assert (tmp_path / "out" / "small.npz").stat().st_size < 5 * 2 ** 20
