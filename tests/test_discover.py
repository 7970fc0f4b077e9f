"""Object discovery (TokenCut, LOST): planted clusters where the answer is known, the eigen-solver against
TokenCut's own generalized call, the masks against a literal re-computation of the references' steps on golden
descriptors of a real frame, the CLI, unsupervised VOS and the two benchmarks (golden ViT-S/8, CPU, small sizes)."""
import json

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from densevit.apps.cli.discover import entry as discover_entry
from densevit.apps.cli.vos import entry as vos_entry
from densevit.apps.discovery.core import (
    DiscoverConfig,
    box_iou,
    discover,
    discover_mask,
    extract_discovery_features,
    lost_tokens,
    mask_box,
    ncut_split,
    ncut_vector,
    token_box,
    tokencut_graph,
    tokencut_tokens,
)
from densevit.apps.refine import bilateral_solve
from PIL import Image

from densevit.errors import DensevitError
from densevit.eval.datasets.davis import read_mask
from densevit.io.paths import golden_weights, shared_dir

DAVIS = shared_dir() / "data" / "davis2016"
FRAME = DAVIS / "JPEGImages" / "480p" / "dog" / "00000.jpg"


@pytest.fixture(scope="module")
def ext(make_extractor):
    return make_extractor(8)


def planted(hw=(9, 12), block=(slice(2, 5), slice(3, 7)), dim=16, noise=0.05, seed=0, anti=False, obj=None):
    """Descriptors of an ``hw`` grid: a background cluster and a small object (``block`` or the mask ``obj``)
    around another direction (``anti``: against the background, so object/background correlations are < 0)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(dim), torch.zeros(dim)
    a[0], b[1] = 1.0, 1.0
    if anti:
        a = -b + 0.3 * a
    if obj is None:
        obj = np.zeros(hw, dtype=bool)
        obj[block] = True
    x = torch.where(torch.from_numpy(obj).reshape(-1, 1), a, b) + noise * torch.randn(obj.size, dim, generator=g)
    return x, obj


# ------------------------------------------------------------------------------------- planted clusters
def test_tokencut_cut_separates_planted_clusters_and_seed_is_in_the_smaller():
    x, obj = planted()
    r = tokencut_tokens(x, obj.shape)
    assert np.array_equal(r.mask, obj) and np.array_equal(r.partition, obj)
    assert obj.reshape(-1)[r.seed]
    assert r.score[obj].min() > r.score[~obj].max()          # oriented: the object side is the high side
    assert token_box(r.mask) == (2, 3, 5, 7)


def test_tokencut_keeps_only_the_seed_component():
    one, two = np.zeros((10, 12), bool), np.zeros((10, 12), bool)
    one[1:4, 1:4] = True
    two[6:9, 7:11] = True
    x, both = planted(obj=one | two)
    r = tokencut_tokens(x, both.shape)
    assert np.array_equal(r.partition, both)                  # one cluster in two places
    assert np.array_equal(r.mask, one) or np.array_equal(r.mask, two)
    assert r.mask.reshape(-1)[r.seed]


def test_lost_seed_is_in_the_smaller_less_correlated_cluster():
    x, obj = planted(anti=True)
    r = lost_tokens(x, obj.shape, k_patches=100)
    assert obj.reshape(-1)[r.seed]
    assert np.array_equal(r.mask, obj)
    degree = -r.score
    assert degree[obj].max() == obj.sum() - 1 and degree[~obj].min() == (~obj).sum() - 1
    # k = 1: only the seed expands, same object here
    assert np.array_equal(lost_tokens(x, obj.shape, k_patches=1).mask, obj)


# ---------------------------------------------------------------------------------------- eigen-solver
@pytest.mark.parametrize("binary", [True, False])
def test_eigh_solver_agrees_with_tokencuts_generalized_call(ext, binary):
    f = extract_discovery_features(ext, FRAME, DiscoverConfig(load_size=64))
    W = tokencut_graph(f.descriptors, 0.2, 1e-5, binary)
    d = W.sum(1)
    vals, vecs = scipy.linalg.eigh(np.diag(d) - W, np.diag(d), subset_by_index=[1, 2])   # TokenCut's call
    ref = vecs[:, 0]
    v, lam = ncut_vector(W.copy(), "eigh")
    assert lam == pytest.approx(vals[0], abs=1e-9)
    assert abs(v @ (d * ref)) == pytest.approx(1.0, abs=1e-8)       # same D-normalised vector up to sign
    assert v @ (d * v) == pytest.approx(1.0, abs=1e-9)
    a = tokencut_tokens(f.descriptors, f.grid.shape, binary_graph=binary, solver="eigh")
    b = tokencut_tokens(f.descriptors, f.grid.shape, binary_graph=binary, solver="generalized")
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.partition, b.partition)
    # the seed is the first maximum of |x|: two solvers agree on its value to round-off, not on a near tie
    for r in (a, b):
        assert abs(r.score.reshape(-1)[r.seed]) == np.abs(r.score).max()
    assert abs(a.score.reshape(-1)[a.seed]) == pytest.approx(abs(b.score.reshape(-1)[b.seed]), rel=1e-7)


def test_tokencut_seed_is_the_first_maximum_of_abs_x_on_exact_ties():
    hw = (3, 4)
    x = np.array([0.1, -0.5, 0.2, 0.3, 0.5, 0.0, -0.1, 0.2, -0.3, 0.1, 0.0, -0.5])   # |x| = 0.5 at 1, 4, 11
    r = ncut_split(x.copy(), hw)
    assert r.seed == 1                                   # the first of the tied maxima, as np.argmax
    assert r.score.reshape(-1)[1] == 0.5                 # oriented: x negated so the seed is on the high side
    assert r.partition.reshape(-1)[1] and r.mask.reshape(-1)[1]
    assert np.array_equal(r.partition.reshape(-1), ~(x > x.mean()))   # TokenCut complements the bipartition
    r = ncut_split(-x, hw)                               # the other sign: the seed's side without flipping
    assert r.seed == 1 and np.array_equal(r.partition.reshape(-1), -x > (-x).mean())


def _lost_input(groups):
    """Token descriptors as one-hot codes of ``groups`` (token -> group id): tokens correlate positively exactly
    with the others of their group, so a token's degree is its group's size minus one."""
    groups = np.asarray(groups)
    return torch.from_numpy(np.eye(groups.max() + 1, dtype=np.float32)[groups])


def _gram_input(positive_pairs, n, c=20.0):
    """Descriptors whose correlation matrix is ``c`` on the diagonal, +2 for ``positive_pairs`` and -1 elsewhere
    (rows of the Cholesky factor of that positive definite matrix)."""
    G = -np.ones((n, n))
    for i, j in positive_pairs:
        G[i, j] = G[j, i] = 2.0
    np.fill_diagonal(G, c)
    return torch.from_numpy(np.linalg.cholesky(G).astype(np.float32))


def test_lost_breaks_degree_ties_by_token_index():
    # groups of sizes 3, 2, 2, 5 laid out in a 3x4 grid: degrees 2, 1, 1, 4; the two pairs tie for the lowest
    groups = [3, 3, 1, 1, 3, 3, 2, 2, 0, 0, 0, 3]
    r = lost_tokens(_lost_input(groups), (3, 4), k_patches=100)
    assert r.seed == 2                                   # tokens 2, 3, 6, 7 share degree 1: the first is the seed
    want = np.zeros(12, bool)
    want[[2, 3]] = True                                  # the seed's group, 4-connected
    assert np.array_equal(r.mask.reshape(-1), want)
    assert np.array_equal(-r.score.reshape(-1), np.array([4, 4, 1, 1, 4, 4, 1, 1, 2, 2, 2, 4]))


def test_lost_keeps_the_earliest_tokens_when_k_patches_splits_a_tie():
    # 2 x 4 grid; tokens 0, 1, 3, 4 have degree 2 (the lowest), the others 3. Token 4 is the seed's only
    # positively correlated low-degree patch, and it correlates with 5, which the seed does not.
    pairs = [(0, 4), (0, 2), (4, 5), (1, 6), (1, 7), (3, 6), (3, 7), (2, 5), (2, 6), (5, 7)]
    x = _gram_input(pairs, 8)
    degrees = -lost_tokens(x, (2, 4)).score.reshape(-1)
    assert np.array_equal(degrees, [2, 2, 3, 2, 2, 3, 3, 3])
    masks = {k: np.flatnonzero(lost_tokens(x, (2, 4), k_patches=k).mask).tolist() for k in (1, 2, 3, 4, 8)}
    # k <= 3 keeps 0, 1, 3 of the tied 0, 1, 3, 4 (token order): only the seed expands -> {0, 4}
    # k >= 4 also keeps 4: M = A[0] + A[4] > 0 on {0, 2, 4, 5}; the seed's 4-connected component is {0, 4, 5}
    assert masks == {1: [0, 4], 2: [0, 4], 3: [0, 4], 4: [0, 4, 5], 8: [0, 4, 5]}
    assert all(lost_tokens(x, (2, 4), k_patches=k).seed == 0 for k in (1, 4))


# ---------------------------------------------------------- the references' steps on golden descriptors
def _reference_keys(ext, img: Image.Image, p: int) -> tuple:
    """Keys of the last block for the image zero-padded (after normalisation) to a multiple of ``p``, as
    main_tokencut.py / main_lost.py feed the network."""
    x, _ = ext.preprocess(img, None)
    H, W = x.shape[-2:]
    x = F.pad(x, (0, -W % p, 0, -H % p))
    k = ext.extract(x, (-1,), ("key",)).descriptors[(-1, "key")][0].float()
    return k, (x.shape[-2] // p, x.shape[-1] // p)


def _reference_tokencut(k: torch.Tensor, dims) -> np.ndarray:
    """object_discovery.ncut written out step by step: dense A and D, generalized eigh, mean split, seed flip,
    the seed's ndimage.label component."""
    feats = F.normalize(k, p=2, dim=1)
    A = (feats @ feats.T).numpy()
    A = np.where((A > 0.2).astype(float) == 0, 1e-5, (A > 0.2).astype(float))
    D = np.diag(A.sum(axis=1))
    _, vecs = scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])
    v = vecs[:, 0]
    part = v > np.sum(v) / len(v)
    seed = np.argmax(np.abs(v))
    if part[seed] != 1:
        part = np.logical_not(part)
    labels, _ = scipy.ndimage.label(part.reshape(dims).astype(float))
    return labels == labels[np.unravel_index(seed, dims)]


def _reference_lost(k: torch.Tensor, dims, k_patches=100) -> np.ndarray:
    """object_discovery.lost written out: A = k k^T, inverse degree, argsort, seed expansion, component."""
    A = k @ k.T
    B = A.clone()
    B.fill_diagonal_(0)
    B[B < 0] = 0
    cent = -torch.sum(B > 0, dim=1).float()
    order = torch.argsort(cent, descending=True)          # LOST's call: not a stable sort
    # On ties this order is the sorting kernel's. The result is defined only where no tie matters: one token of
    # the lowest degree (the seed), and no token that ties with the k-th across the cut correlates positively
    # with the seed (so the similars are the same for every order of the ties). The frame is checked for that.
    deg = -cent
    assert (deg == deg.min()).sum() == 1, "tied lowest degree: LOST's seed is not defined"
    seed = order[0]
    if len(deg) > k_patches:
        tied = torch.nonzero(deg == deg[order[k_patches - 1]]).flatten()
        assert not (A[seed, tied] > 0).any(), "a tie at the k-th patch decides the similars"
    pot = order[:k_patches]
    similars = pot[A[seed, pot] > 0.0]
    M = torch.sum(A[similars, :], dim=0)
    labels, _ = scipy.ndimage.label(M.reshape(dims).numpy() > 0.0)
    return labels == labels[np.unravel_index(int(seed), dims)]


@pytest.mark.parametrize("method", ["tokencut", "lost"])
def test_masks_reproduce_the_references_on_a_real_frame(ext, method):
    img = Image.open(FRAME).convert("RGB").resize((125, 70), Image.LANCZOS)   # not a multiple of 8: padding
    r = discover(ext, img, DiscoverConfig(method=method))
    k, dims = _reference_keys(ext, img, 8)
    ref = (_reference_tokencut if method == "tokencut" else _reference_lost)(k, dims)
    assert np.array_equal(r.tokens.mask, ref)
    pix = ref.repeat(8, 0).repeat(8, 1)[:70, :125]                              # tokens -> pixels, cropped
    assert r.mask.shape == (70, 125) and np.array_equal(r.mask, pix)
    rows, cols = np.nonzero(ref)
    assert r.box == (8.0 * cols.min(), 8.0 * rows.min(), min(8.0 * (cols.max() + 1), 125),
                     min(8.0 * (rows.max() + 1), 70))


def test_round_fit_matches_tokencut_saliency_resize(ext):
    img = Image.open(FRAME).convert("RGB").resize((131, 77), Image.LANCZOS)
    r = discover(ext, img, DiscoverConfig(fit="round"))
    assert r.features.grid.shape == (round(77 / 8), round(131 / 8))
    x = ext.preprocess(img.resize((16 * 8, 10 * 8), Image.LANCZOS), None)[0]
    k = ext.extract(x, (-1,), ("key",)).descriptors[(-1, "key")][0].float()
    ref = _reference_tokencut(k, (10, 16))
    assert np.array_equal(r.tokens.mask, ref)
    up = F.interpolate(torch.from_numpy(ref.astype(np.float32))[None, None], size=(77, 131), mode="nearest")[0, 0]
    assert (r.mask == up.numpy().astype(bool)).mean() >= 0.99       # nearest-upsampling conventions differ


# --------------------------------------------------------------------------------- images and outputs
def test_discover_on_a_photo_is_deterministic_with_original_size_outputs(ext, images):
    for path in images[1:]:
        a = discover(ext, path, load_size=64)
        b = discover(ext, path, load_size=64, method="lost")
        H, W = Image.open(path).size[::-1]
        for r in (a, b):
            assert r.mask.shape == (H, W) and r.mask.dtype == bool and r.mask.any()
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            mb = mask_box(r.mask)
            assert box_iou(r.box, mb) > 0.9                              # the box is the mask's (token) box
            assert r.score_map().shape == (H, W)
        again = discover(ext, path, load_size=64)
        assert np.array_equal(a.mask, again.mask) and a.box == again.box and a.tokens.seed == again.tokens.seed


def test_crf_refinement_and_token_limit(ext, images):
    r = discover(ext, images[1], load_size=64, refine="crf")
    assert r.refined and r.mask.shape == Image.open(images[1]).size[::-1]
    with pytest.raises(DensevitError, match="tokens"):
        discover(ext, images[0], load_size=200, max_tokens=500)
    with pytest.raises(DensevitError, match="unknown method"):
        discover(ext, images[0], method="grabcut")


def test_box_helpers():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == (3.0, 2.0, 9.0, 5.0) and mask_box(np.zeros((3, 3), bool)) is None
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_cli_writes_masks_pictures_and_boxes_and_skips_a_bad_image(tmp_path, images, capsys, monkeypatch, ext):
    import densevit.apps.cli.discover as cli

    monkeypatch.setattr(cli, "build_extractor", lambda args: ext)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    argv = [str(FRAME), str(bad), str(images[1]), "--out", str(out), "--load-size", "64", "--quiet"]
    assert discover_entry(argv) == 1
    cap = capsys.readouterr()
    assert "broken.jpg" in cap.err and "Traceback" not in cap.err and len(cap.err.strip().splitlines()) == 2
    for stem, path in (("00000", FRAME), ("ibex", images[1])):
        m = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert m.shape == Image.open(path).size[::-1]
        assert set(np.unique(m)) <= {0, 255}
        assert (out / f"{stem}_overlay.png").is_file() and (out / f"{stem}_eigvec.png").is_file()
    boxes = json.loads((out / "boxes.json").read_text())
    assert set(boxes["images"]) == {"00000", "ibex"} and boxes["settings"]["tau"] == 0.2
    assert len(boxes["images"]["ibex"]["box_xyxy"]) == 4
    before = (out / "ibex_mask.png").read_bytes()
    assert discover_entry(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "ibex_mask.png").read_bytes() == before
    assert discover_entry([str(FRAME), "--out", str(out / "lost"), "--method", "lost", "--load-size", "64",
                           "--quiet"]) == 0
    assert (out / "lost" / "00000_degree.png").is_file()


def test_vos_discover_propagates_the_discovered_first_mask(tmp_path, monkeypatch, ext):
    import densevit.apps.cli.vos as cli

    monkeypatch.setattr(cli, "build_extractor", lambda args: ext)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"{i:05d}.jpg").write_bytes((DAVIS / "JPEGImages" / "480p" / "dog" / f"{i:05d}.jpg").read_bytes())
    out = tmp_path / "masks"
    assert vos_entry(["--frames", str(frames), "--discover", "--short-side", "64", "--out", str(out),
                      "--quiet"]) == 0
    first = read_mask(out / "00000.png")
    expected = discover_mask(ext, frames / "00000.jpg", DiscoverConfig(load_size=64))
    assert np.array_equal(first, expected) and first.max() == 1
    assert read_mask(out / "00002.png").shape == first.shape
    with pytest.raises(SystemExit):                                       # neither a mask nor --discover
        vos_entry(["--frames", str(frames), "--out", str(out), "--short-side", "64"])


def test_benchmarks_unsupervised_davis_and_discovery(tmp_path, load_benchmark, capsys, monkeypatch, ext):
    davis = load_benchmark("davis")
    monkeypatch.setattr(davis, "build_extractor", lambda args: ext)
    argv = ["--unsupervised", "--sequences", "dog", "--max-frames", "3", "--short-side", "64",
            "--weights", str(golden_weights()), "--out", str(tmp_path / "unsup"), "--quiet"]
    assert davis.entry(argv) == 0
    out = capsys.readouterr().out
    assert "unsupervised" in out and "J&F-Mean" in out
    settings = json.loads((tmp_path / "unsup" / "settings.json").read_text())
    assert settings["unsupervised"] and settings["discover"]["load_size"] == 64
    assert len(list((tmp_path / "unsup" / "dog").glob("*.png"))) == 3

    bench = load_benchmark("discover")
    monkeypatch.setattr(bench, "build_extractor", lambda args: ext)
    argv = ["--sequences", "dog,blackswan", "--max-frames", "2", "--load-size", "64", "--backbone", "dino_vits8",
            "--stride", "8", "--weights", str(golden_weights()), "--out", str(tmp_path / "disc"), "--quiet"]
    assert bench.entry(argv) == 0
    rows = (tmp_path / "disc" / "discover_results.csv").read_text().splitlines()
    assert rows[0] == "Method,Sequence,Frames,CorLoc,J-Mean,J-Recall" and len(rows) == 1 + 2 * 3
    assert rows[3].startswith("tokencut,all frames,4,")
    records = (tmp_path / "disc" / "records.jsonl").read_text().splitlines()
    assert len(records) == 8 and {json.loads(r)["method"] for r in records} == {"tokencut", "lost"}
    assert bench.entry(argv) == 0                                          # resumed: nothing recomputed
    assert len((tmp_path / "disc" / "records.jsonl").read_text().splitlines()) == 8
    assert bench.entry(argv + ["--tau", "0.3"]) == 2 and "other settings" in capsys.readouterr().err


def _reference_bilateral(im, target, ss=16, sl=16, sc=8):
    """bilateral_solver.py's steps written out: base-255 hash of the truncated XYLUV coordinates, [1 0 1] blurs,
    bistochastisation, Jacobi-preconditioned CG from the flat start."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    M2 = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    yuv = np.tensordot(im.astype(float), M2, ([2], [1])) + np.array([0, 128.0, 128.0]).reshape(1, 1, -1)
    Iy, Ix = np.mgrid[:im.shape[0], :im.shape[1]]
    c = np.dstack(((Ix / ss).astype(int), (Iy / ss).astype(int), (yuv[..., 0] / sl).astype(int),
                   (yuv[..., 1:] / sc).astype(int))).reshape(-1, 5)
    hv = 255.0 ** np.arange(5)
    uh, ui, idx = np.unique(c @ hv, return_index=True, return_inverse=True)
    uc, nv, npx = c[ui], len(ui), c.shape[0]
    S = sp.csr_matrix((np.ones(npx), (idx.reshape(-1), np.arange(npx))))
    blurs = []
    for d in range(5):
        blur = 0.0
        for off in (-1, 1):
            ov = np.zeros((1, 5))
            ov[:, d] = off
            nh = (uc + ov) @ hv
            locs = np.clip(np.searchsorted(uh, nh), 0, nv - 1)
            vi = np.flatnonzero(uh[locs] == nh)
            blur = blur + sp.csr_matrix((np.ones(len(vi)), (vi, locs[vi])), shape=(nv, nv))
        blurs.append(blur)

    def bl(x):
        return 10 * x + sum(b.dot(x) for b in blurs)

    m, n = S.dot(np.ones(npx)), np.ones(nv)
    for _ in range(10):
        n = np.sqrt(n * m / bl(n))
    m = n * bl(n)
    Dm, Dn = sp.diags(m, 0), sp.diags(n, 0)
    w = np.full((npx, 1), 0.999)
    x = target.reshape(-1, 1).astype(float)
    A = 256 * (Dm - Dn.dot(bl(Dn))) + sp.diags(S.dot(w)[:, 0], 0)
    b = S.dot(x * w)
    Mp = sp.diags(1 / np.maximum(A.diagonal(), 1e-5), 0)
    y, _ = cg(A, b[:, 0], x0=(b / S.dot(w))[:, 0], M=Mp, maxiter=25, rtol=1e-5)
    return S.T.dot(y).reshape(target.shape)


def test_bilateral_solver_matches_the_reference_steps(ext):
    im = np.asarray(Image.open(FRAME).convert("RGB").resize((107, 60), Image.LANCZOS))
    r = discover(ext, Image.fromarray(im), refine="bilateral")
    target = r.features.to_image(r.tokens.mask).astype(np.float64)
    ours = bilateral_solve(im, target)
    ref = _reference_bilateral(im, target)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert r.refined and np.array_equal(r.mask, ours > 0.5)
