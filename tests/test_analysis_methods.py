"""Spatial information per layer, occlusion / token-drop robustness and neuron visualisation: the mechanics, on
the golden random weights (ViT-S/8, DINOv2 with registers, DINOv3 with RoPE) and through densevit-analyze."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from densevit.eval.analysis.neurons import unit_activation, visualize_unit
from densevit.eval.analysis.robustness import (
    drop_order,
    dropped_mask,
    forward_tokens,
    mask_pixels,
    occlusion_robustness,
)
from densevit.eval.analysis.spatial import own_position_share, position_similarity, spatial_information

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL = {"dinov2_vits14_reg": "dinov2_vits14_reg_random_official_fp16.pth",
            "dinov3_vits16": "dinov3_vits16_random_official_fp16.pth"}


@pytest.fixture(scope="module")
def official(shared):
    from densevit.features.extractor import ViTExtractor

    return {name: ViTExtractor(name, weights=str(shared / "golden" / f), device="cpu") for name, f in OFFICIAL.items()}


# ------------------------------------------------------------------------------------------------- spatial
def test_token_identical_to_its_embedding_scores_its_own_position():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 49, 32, generator=g)
    sim = position_similarity(emb, emb)
    assert own_position_share(sim) == 1.0
    assert torch.allclose(sim.diagonal(dim1=-2, dim2=-1), torch.ones(2, 49), atol=1e-5)
    shifted = torch.roll(emb, 1, dims=1)              # every token carries its neighbour's embedding
    assert own_position_share(position_similarity(shifted, emb)) == 0.0


def test_spatial_information_on_golden(make_extractor, images):
    ext = make_extractor(8)
    st = spatial_information(ext, images, load_size=64, layers=(0, 5, 11), queries_per_side=2, progress=False)
    assert st.grid_hw == (8, 8) and st.maps.shape == (3, 4, 8, 8)
    assert np.all((st.own_share >= 0) & (st.own_share <= 1))
    # block 0 keeps most of its input: its tokens are nearest their own input position more often than at the end
    assert st.own_share[0] > 0.5 and st.own_share[0] >= st.own_share[-1]
    q = st.queries.index((0, 0))
    assert np.argmax(st.maps[0, q]) == 0                # layer 0's token (0, 0) is most like input (0, 0)


# ------------------------------------------------------------------------------------------------ robustness
def test_drop_order_and_masks():
    sal = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert drop_order(sal, "salient").tolist() == [1, 2, 3, 0]
    assert drop_order(sal, "non_salient").tolist() == [0, 3, 2, 1]
    assert sorted(drop_order(sal, "random", torch.Generator().manual_seed(1)).tolist()) == [0, 1, 2, 3]
    m = dropped_mask(drop_order(sal, "salient"), 0.5)
    assert m.tolist() == [False, True, True, False]
    assert not dropped_mask(drop_order(sal, "salient"), 0.0).any()
    x = torch.ones(1, 3, 4, 4)
    y = mask_pixels(x, m, (2, 2), 2)
    assert y[0, :, :2, 2:].eq(0).all() and y[0, :, 2:, :2].eq(0).all()       # cells 1 and 2 zeroed
    assert y[0, :, :2, :2].eq(1).all() and y[0, :, 2:, 2:].eq(1).all()


def test_dropping_nothing_changes_nothing(make_extractor, images, official):
    for ext in [make_extractor(8), *official.values()]:
        st = occlusion_robustness(ext, images[:1], load_size=64, layers=(0, -1), ratios=(0.0, 0.5), progress=False)
        assert np.allclose(st.descriptor_cos[:, :, 0], 1.0, atol=1e-4), ext.spec.name
        assert np.allclose(st.cls_cos[:, :, 0], 1.0, atol=1e-4), ext.spec.name
        assert (st.descriptor_cos[:, :, 1, -1] < 0.9999).all(), ext.spec.name   # dropping half does change them


def test_token_drop_keeps_every_token_equals_the_full_run(official):
    ext = official["dinov3_vits16"]                   # RoPE: the kept tokens keep their rotary positions
    x, grid = ext.preprocess(torch.rand(3, 64, 80), (64, 80))
    T = grid.shape[0] * grid.shape[1]
    full = forward_tokens(ext, x, [11])
    same = forward_tokens(ext, x, [11], keep=torch.arange(T))
    assert torch.allclose(full[11][0], same[11][0], atol=1e-5)
    keep = torch.arange(0, T, 2)
    part = forward_tokens(ext, x, [0], keep=keep)
    assert part[0][0].shape[1] == len(keep)


def test_top1_with_a_classifier_head(make_extractor, images):
    ext = make_extractor(8)
    clean = [forward_tokens(ext, ext.preprocess(p, (64, 64))[0], [11])[-1][1][0] for p in images]
    w = torch.stack(clean)                            # a head that recognises each image by its own CLS
    head = lambda cls: cls.cpu() @ torch.nn.functional.normalize(w, dim=-1).T  # noqa: E731
    st = occlusion_robustness(ext, images, load_size=64, layers=(-1,), ratios=(0.0, 0.9), modes=("salient",),
                              classifier=head, labels=[0, 1], progress=False)
    assert st.meta["clean_top1"] == 1.0
    assert np.all(st.top1[:, :, 0] == 1.0)


# --------------------------------------------------------------------------------------------------- neurons
@pytest.mark.parametrize("kind", ["mlp", "key", "token"])
def test_activation_maximisation_raises_the_unit(make_extractor, kind):
    ext = make_extractor(8)
    runs = [visualize_unit(ext, 4, kind, unit, size=32, steps=25, ensemble=2, jitter=2, seed=seed)
            for unit, seed in ((7, 1), (100, 2), (11, 2))]
    assert all(it.image.shape == (32, 32, 3) and it.image.dtype == np.uint8 for it in runs)
    assert np.mean([it.end for it in runs]) > np.mean([it.start for it in runs])   # the plain image, on average
    for it in runs:                                   # the optimised (augmented) objective rises
        h = np.asarray(it.history)
        q = len(h) // 4
        assert h[-q:].mean() > h[:q].mean()


def test_unit_activation_reads_the_feed_forward_hidden_unit(make_extractor):
    ext = make_extractor(8)
    x, _ = ext.preprocess(torch.rand(3, 32, 32), (32, 32))
    blk = ext.model.blocks[2]
    got = []
    hook = blk.mlp.act.register_forward_hook(lambda m, a, out: got.append(out))
    try:
        a = unit_activation(ext, x, 2, "mlp", 5)
    finally:
        hook.remove()
    assert torch.allclose(a, got[0][:, 1:, 5].mean(-1), atol=1e-6)


def test_methods_run_on_registers_and_rope(official, images):
    for name, ext in official.items():
        st = spatial_information(ext, images[:1], load_size=64, layers=(0, -1), queries_per_side=2, progress=False)
        assert st.maps.shape[0] == 2 and np.isfinite(st.own_share).all(), name
        it = visualize_unit(ext, -1, "mlp", 0, size=32, steps=4, ensemble=1)
        assert np.isfinite(it.end), name


# ----------------------------------------------------------------------------------------------------- CLI
def test_analyze_methods_cli(tmp_path, images, golden_path):
    from densevit.cli.analyze import entry, main

    out = tmp_path / "out"
    argv = [str(images[0]), "-o", str(out), "--weights", str(golden_path), "--device", "cpu", "--quiet",
            "--analyses", "spatial", "robustness", "neurons", "--load-size", "48", "--layers", "0", "11",
            "--drop-ratios", "0", "0.5", "--drop-modes", "salient", "--neuron-layers", "11", "--units", "0", "1",
            "--neuron-steps", "3", "--neuron-size", "32", "--neuron-ensemble", "1"]
    assert main(argv) == 0
    stem = "dino_vits8-vits8_random_fp16"
    for f in [f"{stem}_spatial_maps.png", "spatial_by_layer.png", f"{stem}_robustness.png",
              f"{stem}_robustness_layers.png", f"{stem}_neurons_mlp_L11.png"]:
        assert (out / f).read_bytes()[:4] == b"\x89PNG", f
    rows = list(csv.DictReader(open(out / f"{stem}_robustness.csv")))
    assert {r["ratio"] for r in rows} == {"0.0", "0.5"}
    assert all(float(r["descriptor_cos"]) > 0.9999 for r in rows if r["ratio"] == "0.0")
    assert len(list(csv.DictReader(open(out / f"{stem}_neurons.csv")))) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["spatial"][stem]["own_share"]) == 2
    assert entry(argv) == 2                                      # outputs exist: refused without --overwrite


@pytest.mark.parametrize("flags,msg", [(["--analyses", "robustness", "--drop-ratios", "1.0"], "drop-ratios"),
                                       (["--analyses", "neurons", "--neuron-steps", "0"], "neuron-steps"),
                                       (["--analyses", "robustness", "--stride", "4"], "patch stride"),
                                       (["--analyses", "neurons", "--units", "1536"], "out of range"),
                                       (["--analyses", "robustness", "--classifier-head", "/nonexistent"],
                                        "classifier-head")])
def test_analyze_methods_bad_flags(tmp_path, images, golden_path, capsys, flags, msg):
    from densevit.cli.analyze import entry

    code = entry([str(images[0]), "-o", str(tmp_path / "o"), "--weights", str(golden_path), "--device", "cpu",
                  *flags])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
