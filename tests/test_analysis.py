"""densevit.eval.analysis: attention statistics on planted patterns, CKA properties, sweep, and the CLI end to end."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densevit.eval.analysis import (
    AttentionAccumulator,
    FunctionTask,
    MinibatchCKA,
    attention_stats,
    best_layers,
    cka_matrix,
    head_statistics,
    linear_cka,
    resample_tokens,
    run_sweep,
)
from densevit.eval.analysis.attention import offset_support
from densevit.io.paths import golden_weights, shared_dir
from densevit.models.grid import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# ------------------------------------------------------------------------------------------- planted attention
def planted_head(h: int, w: int, dy: int, dx: int, peak: float = 0.8, cls: bool = True) -> torch.Tensor:
    """``T x T`` attention (CLS first when ``cls``) whose every query puts ``peak`` on the token at ``(dy, dx)``
    from it; queries whose target is outside the grid put it on themselves. The rest is spread uniformly."""
    P = 1 if cls else 0
    T = P + h * w
    a = torch.full((T, T), (1 - peak) / T)
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, c = r.flatten(), c.flatten()
    tr, tc = r + dy, c + dx
    inside = (tr >= 0) & (tr < h) & (tc >= 0) & (tc < w)
    tgt = torch.where(inside, tr * w + tc, r * w + c)
    a[P + torch.arange(h * w), P + tgt] += peak
    if cls:
        a[0] = 1.0 / T
    return a


def uniform_head(h: int, w: int, cls: bool = True) -> torch.Tensor:
    T = (1 if cls else 0) + h * w
    return torch.full((T, T), 1.0 / T)


def test_planted_offset_head_detected_uniform_not():
    h, w = 7, 9
    attn = torch.stack([planted_head(h, w, 0, 1), uniform_head(h, w), planted_head(h, w, -1, 1),
                        torch.softmax(torch.randn(1 + h * w, 1 + h * w, generator=torch.Generator().manual_seed(0)),
                                      -1)])[None]
    st = head_statistics(attn, (h, w), has_cls=True, radius=2, threshold=0.5)
    assert st.offset[0, 0].tolist() == [0, 1]
    # border handling: the last column has no right neighbour and is not counted, so the head scores exactly 1
    assert st.offset_fraction[0, 0] == pytest.approx(1.0)
    assert st.offset[0, 2].tolist() == [-1, 1] and st.offset_fraction[0, 2] == pytest.approx(1.0)
    assert st.offset_heads[0].tolist() == [True, False, True, False]
    assert st.offset_fraction[0, 1] == 0.0             # uniform: arg-max is the CLS token, no offset at all
    assert st.offset_head_list()[0] == {"layer": 0, "head": 0, "dy": 0, "dx": 1, "fraction": pytest.approx(1.0)}
    # other statistics of the uniform head
    assert st.entropy_norm[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert st.cls_share[0, 1] == pytest.approx(1.0 / (1 + h * w))
    assert st.mean_distance[0, 0] < st.mean_distance[0, 1]


def test_offset_without_cls_and_edge_attention_is_not_an_offset():
    h, w = 6, 8
    # every query attends to the last column of its own row: an image-edge pattern, not a fixed offset
    T = h * w
    edge = torch.full((T, T), 0.1 / T)
    rows = torch.arange(T) // w
    edge[torch.arange(T), rows * w + (w - 1)] += 0.9
    attn = torch.stack([planted_head(h, w, 1, 0, cls=False), edge, uniform_head(h, w, cls=False)])[None]
    st = head_statistics(attn, (h, w), has_cls=False, radius=2, threshold=0.5)
    assert st.offset[0, 0].tolist() == [1, 0] and st.offset_fraction[0, 0] == pytest.approx(1.0)
    assert not st.offset_heads[0, 1] and st.offset_fraction[0, 1] < 0.2
    assert not st.offset_heads[0, 2]
    assert np.isnan(st.cls_share).all()


def test_offset_support_counts_eligible_queries():
    sup = offset_support((4, 5), radius=1)
    assert sup[1, 1] == 20 and sup[1, 2] == 4 * 4 and sup[0, 0] == 3 * 4


def test_accumulator_mixes_grid_sizes():
    acc = AttentionAccumulator(radius=2, threshold=0.5)
    for h, w in [(5, 7), (8, 6)]:
        acc.update(3, torch.stack([planted_head(h, w, 0, -1), uniform_head(h, w)])[None], (h, w), True)
    st = acc.result()
    assert st.layers == [3] and st.n_queries.tolist() == [5 * 7 + 8 * 6]
    assert st.offset[0, 0].tolist() == [0, -1] and st.offset_fraction[0, 0] == pytest.approx(1.0)
    assert st.offset_heads[0].tolist() == [True, False]


class PlantedExtractor:
    """A stand-in for ViTExtractor whose layer ``l`` attention is planted: head 0 of layer 1 looks one token to
    the right, everything else is uniform. Records which layers each extract call asked for."""

    depth, num_heads, patch_size, stride = 3, 2, 8, 8

    def __init__(self):
        from types import SimpleNamespace

        self.spec = SimpleNamespace(name="planted")
        self.model = SimpleNamespace(cls_token=torch.zeros(1))
        self.calls = []

    def preprocess(self, image, load_size):
        hw = (8 * image, 8 * (image + 2))
        return torch.zeros(1, 3, *hw), TokenGrid(8, 8, hw, hw)

    def iter_extract(self, x, layers, facets, include_cls=False, **_):
        grid = TokenGrid(8, 8, tuple(x.shape[-2:]))
        h, w = grid.shape
        self.calls.append([])
        for l in layers:
            heads = [planted_head(h, w, 0, 1) if l == 1 else uniform_head(h, w), uniform_head(h, w)]
            self.calls[-1].append(l)
            yield l, {"attn": torch.stack(heads)[None]}


def test_attention_stats_one_layer_at_a_time():
    ext = PlantedExtractor()
    st = attention_stats(ext, [4, 5], load_size=None, progress=False)
    assert ext.calls == [[0, 1, 2], [0, 1, 2]]  # one streaming pass per image, layer by layer
    assert st.offset_heads.tolist() == [[False, False], [True, False], [False, False]]
    assert st.offset_head_list() == [{"layer": 1, "head": 0, "dy": 0, "dx": 1, "fraction": pytest.approx(1.0)}]


def test_attention_plots_readable(tmp_path):
    from densevit.eval.analysis.plots import plot_attention_stats, plot_distance_by_layer

    st = attention_stats(PlantedExtractor(), [4, 5], load_size=None, progress=False)
    paths = plot_attention_stats(st, tmp_path, prefix="planted_")
    paths["by_layer"] = plot_distance_by_layer({"planted": st}, tmp_path / "by_layer.png")
    assert set(paths) == {"distance", "offset", "entropy", "cls_share", "by_layer"}
    for p in paths.values():
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------- CKA
def _feats(n=400, d=48, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_self_orthogonal_isotropic(unbiased):
    x = _feats()
    q, _ = torch.linalg.qr(_feats(48, 48, seed=1))
    assert linear_cka(x, x, unbiased) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ q, unbiased) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 7.5 * x, unbiased) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 0.3 * x @ q + 4.0, unbiased) == pytest.approx(1.0, abs=1e-9)   # + a constant shift


def test_cka_independent_near_zero_unbiased():
    x, y = _feats(seed=2), _feats(d=64, seed=3)
    assert abs(linear_cka(x, y, unbiased=True)) < 0.02
    assert linear_cka(x, y, unbiased=False) > 0.05       # the biased estimator is positively biased


def test_minibatch_cka_accumulates():
    x = _feats(600, 32, seed=4)
    z = x[:, :8] + 0.5 * _feats(600, 8, seed=5)          # partly shared
    y = _feats(600, 16, seed=6)
    m = cka_matrix([x, z, y], batch_size=100)
    assert m.shape == (3, 3) and torch.allclose(torch.diagonal(m), torch.ones(3, dtype=m.dtype))
    assert torch.allclose(m, m.T)
    assert m[0, 1] > 0.2 and abs(m[0, 2]) < 0.05 and abs(m[1, 2]) < 0.05
    # the minibatch estimate agrees with the full-batch unbiased CKA
    assert float(m[0, 1]) == pytest.approx(linear_cka(x, z), abs=0.05)
    two = MinibatchCKA(2, 1)
    for s in range(0, 600, 150):
        two.update([x[s:s + 150], z[s:s + 150]], [x[s:s + 150] @ torch.linalg.qr(_feats(32, 32, seed=7))[0]])
    out = two.compute()
    assert out.shape == (2, 1) and float(out[0, 0]) == pytest.approx(1.0, abs=1e-9)
    assert float(out[1, 0]) == pytest.approx(float(m[0, 1]), abs=0.05)


def test_resample_tokens_between_grids():
    fine = TokenGrid(8, 8, (64, 96), (128, 192))                # 8 x 12
    coarse = TokenGrid(16, 16, (64, 96), (128, 192))            # 4 x 6
    cols = fine.token_centers()[:, 0:1].float()                 # feature = x coordinate of the token centre
    assert torch.equal(resample_tokens(cols, fine, fine), cols)
    out = resample_tokens(cols, fine, coarse)
    assert out.shape == (coarse.num_tokens, 1)
    assert torch.allclose(out[:, 0], coarse.token_centers()[:, 0].float(), atol=1e-3)


class SmoothFieldExtractor:
    """A stand-in whose layer-``l`` token features are a fixed smooth function of the token centre's position in
    the original image (so two models with different patch sizes see the same field on different grids)."""

    depth = 3

    def __init__(self, patch: int, seed: int):
        self.patch = patch
        self.mix = torch.randn(self.depth, 8, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def preprocess(self, image, load_size):
        hw = (64, 96)
        return torch.zeros(1, 3, *hw), TokenGrid(self.patch, self.patch, hw, (128, 192))

    def extract(self, x, layers, facets, **_):
        from densevit.features.extractor import Features

        grid = TokenGrid(self.patch, self.patch, tuple(x.shape[-2:]), (128, 192))
        xy = grid.token_centers() / 192.0
        basis = torch.cat([torch.sin(3 * xy), torch.cos(2 * xy), xy, xy ** 2], dim=1)      # T x 8
        return Features({(l, f): (basis @ self.mix[l]).float()[None] for l in layers for f in facets}, grid)


def test_model_cka_two_models_on_different_grids():
    from densevit.eval.analysis import model_cka

    a, b = SmoothFieldExtractor(8, seed=0), SmoothFieldExtractor(16, seed=1)
    res = model_cka([a, b], [0, 1, 2], load_size=None, progress=False)
    assert set(res) == {(0, 0), (0, 1), (1, 1)}
    assert res[(0, 1)].shape == (3, 3) and np.allclose(np.diag(res[(0, 0)]), 1.0)
    # the same 8-dim field behind both models: similar, though each layer mixes it differently
    assert (res[(0, 1)] > 0.5).all()


# ----------------------------------------------------------------------------------------------------- sweep
def test_sweep_with_task_callables():
    from types import SimpleNamespace

    ext = SimpleNamespace(depth=4, spec=SimpleNamespace(name="toy"), extract=None)
    task = FunctionTask("peak", lambda e, layer, facet: {"score": -abs(layer - 2) + (facet == "key"), "aux": 1.0})
    recs = run_sweep([("toy", ext)], [task], facets=("key", "value"), progress=False)
    assert len(recs) == 8 and {r["task"] for r in recs} == {"peak"}
    best = {(b["facet"]): (b["layer"], b["score"]) for b in best_layers(recs)}
    assert best == {"key": (2, 1.0), "value": (2, 0.0)}


# ------------------------------------------------------------------------------------------- CLI end to end
def _small_images():
    jpeg = shared_dir() / "data" / "davis2016" / "JPEGImages" / "480p"
    return [jpeg / "blackswan" / "00000.jpg", jpeg / "dog" / "00000.jpg"]


needs_data = pytest.mark.skipif(not golden_weights().is_file() or not all(p.is_file() for p in _small_images()),
                                reason="shared golden weights / images not available")


@needs_data
def test_cli_end_to_end_writes_every_plot(tmp_path, capsys, monkeypatch, make_extractor):
    pytest.importorskip("matplotlib")
    import densevit.features.extractor
    from densevit.cli.analyze import entry
    from densevit.eval.analysis.sweep import available_tasks

    built = []

    def cached(backbone, stride=None, weights=None, device=None, dtype=None):
        """The session's golden extractor (building a ViT is slow on this CPU); the real class checks the flags."""
        assert (backbone, Path(weights), device, dtype) == ("dino_vits8", golden_weights(), "cpu", "float32")
        built.append(backbone)
        return make_extractor(stride)

    monkeypatch.setattr(densevit.features.extractor, "ViTExtractor", cached)

    out = tmp_path / "out"
    tasks = available_tasks()
    argv = [str(p) for p in _small_images()] + [
        "-o", str(out), "--backbone", "dino_vits8", "--weights", str(golden_weights()), "--stride", "8",
        "--load-size", "96", "--device", "cpu", "--layers", "0", "5", "11", "--no-progress",
        "--compare", f"dino_vits8={golden_weights()}"]
    if tasks:
        argv += ["--analyses", "attention", "cka", "sweep", "--tasks", *tasks, "--warp-pairs", "2",
                 "--davis-frames", "3", "--davis-sequences", "blackswan"]
    assert entry(argv) == 0
    assert len(built) == 2
    summary = json.loads((out / "summary.json").read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    label, label2 = (m["label"] for m in summary["models"])
    assert label2 == label + "-2"
    expected = {f"{l}_attn_{k}.png" for l in (label, label2) for k in ("distance", "offset", "entropy", "cls_share")}
    expected |= {"attn_distance_by_layer.png", f"cka_{label}.png", f"cka_{label2}.png", f"cka_{label}_vs_{label2}.png"}
    expected |= {f"sweep_{t}.png" for t in tasks}
    assert set(pngs) == expected
    assert set(summary["files"]) == {p.name for p in out.iterdir()}
    for p in out.glob("*.png"):
        assert p.stat().st_size > 5000
    # the numbers: per-head rows, CKA symmetric with unit diagonal, same weights -> identical models
    rows = list(csv.DictReader(open(out / f"{label}_attention.csv")))
    assert len(rows) == 3 * 6 and {"mean_distance", "offset_fraction", "offset_head"} <= set(rows[0])
    cka = json.loads((out / "summary.json").read_text())["cka"]["matrices"]
    self_m = np.array(cka[f"cka_{label}"])
    assert np.allclose(np.diag(self_m), 1.0) and np.allclose(self_m, self_m.T, atol=1e-6)
    assert np.allclose(np.array(cka[f"cka_{label}_vs_{label2}"]), self_m, atol=1e-6)
    att = summary["attention"][label]
    assert att["offset_heads"] == []        # random weights: no offset local heads
    if tasks:
        sweep = list(csv.DictReader(open(out / "sweep.csv")))
        assert len(sweep) == 2 * len(tasks) * 3
    # existing outputs are not overwritten without --overwrite: one-line error, exit 2
    capsys.readouterr()
    assert entry(argv) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "Traceback" not in err


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from densevit.cli.analyze import entry

    assert entry([str(tmp_path / "missing.jpg"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densevit-analyze: error:") and "Traceback" not in err
    assert entry([str(tmp_path), "-o", str(tmp_path / "o"), "--compare", "no_such_backbone"]) == 2


def test_every_builtin_task_is_available():
    """The task modules are named by string: a wrong name must not drop a task without a word."""
    from densevit.eval.analysis.sweep import available_tasks, known_tasks

    assert available_tasks() == known_tasks() == ["warp_pck", "davis_jf", "coseg"]


def test_a_missing_task_module_is_an_error(monkeypatch):
    from densevit.errors import DensevitError
    from densevit.eval.analysis import sweep

    builders = dict(sweep._task_builders(), warp_pck=("densevit.datasets.warp", sweep.WarpPCKTask))
    monkeypatch.setattr(sweep, "_task_builders", lambda: builders)
    with pytest.raises(DensevitError, match="densevit.datasets.warp"):
        sweep.available_tasks()
