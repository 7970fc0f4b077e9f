"""Object discovery without labels: TokenCut (Wang et al. 2022) and LOST (Simeoni et al. 2021) on ViT descriptors.

Both methods work on one image's patch descriptors, by default the keys of the last block (CLS token dropped),
at stride = patch size, on the image at its original size zero-padded (after normalisation) at the bottom and
right to a multiple of the patch size -- exactly the inputs of the official ``main_tokencut.py`` / ``main_lost.py``.

**TokenCut** (reference ``object_discovery.py::ncut``):

1. ``F``: the ``T`` descriptors, each L2-normalised; ``S = F F^T`` (cosine similarities).
2. Graph ``W_ij = 1 if S_ij > tau else eps`` (``tau`` = 0.2, ``eps`` = 1e-5; the ablation ``binary_graph=False``
   keeps ``S_ij`` where ``S_ij >= tau``); degrees ``d = W 1``, ``D = diag(d)``.
3. ``x``: the eigenvector of the second smallest eigenvalue of ``(D - W) x = lambda D x``.
4. Bipartition ``x > mean(x)``; the seed is ``argmax |x|`` (the first maximum in token order, as ``np.argmax``);
   if the seed is not in the bipartition, ``x`` is negated and the bipartition complemented (so the object side
   holds the seed).
5. The object is the 4-connected component of the bipartition that holds the seed (``scipy.ndimage.label``);
   its box spans the component's tokens.

The eigenproblem: the reference calls ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])`` with a dense ``D``.
``D`` is diagonal, so the same problem is solved here (``solver="eigh"``) as the standard symmetric problem
``(I - D^-1/2 W D^-1/2) y = lambda y``, ``x = D^-1/2 y`` -- exactly the reduction LAPACK's generalized solver
applies after its Cholesky factorisation of ``D`` -- with ``scipy.linalg.eigh(..., subset_by_index=[1, 1])``: one
``TxT`` float64 matrix (built in place), no ``TxT`` ``D``, and ``x`` normalised as the reference's
(``x^T D x = 1``). ``solver="generalized"`` makes the reference's call itself (kept to check the agreement;
``tests/test_discover.py``). The result does not depend on the eigenvector's sign.

**LOST** (reference ``object_discovery.py::lost``):

1. ``A = K K^T`` of the raw (not normalised) descriptors.
2. Degree of a patch: the number of other patches with a positive correlation (``A_ij > 0``, ``j != i``); patches
   sorted by increasing degree; the seed is the first.
3. Seed expansion: of the ``k_patches`` (100) lowest-degree patches, those positively correlated with the seed
   (``A[seed, j] > 0``, the seed included) are the ``similars``; ``M = sum_{s in similars} A[s, :]``.

Ties: LOST sorts with ``torch.argsort(-degree, descending=True)``, which is not a stable sort, so among patches of
equal degree its order is whatever the sorting kernel gives (it can change with the PyTorch version, the device
and the number of tokens). densevit orders them by token index (row-major; a stable sort), so the result is
defined and the same everywhere: of several patches of the lowest degree the first in token order is the seed,
and where the ``k_patches``-th and the next patch have equal degree, the earlier ones in token order are kept.
Without such ties both give the same seed and the same mask.
4. The object is the 4-connected component of ``M > 0`` that holds the seed; the box spans it.

Boxes are ``(x0, y0, x1, y1)`` in original-image pixels with exclusive maxima: the component's token rows and
columns ``[r0, r1) x [c0, c1)`` cover the input pixels ``[s*c0, s*(c1-1) + p)`` (``p`` patch size, ``s`` stride;
``p * [c0, c1)`` at stride = patch, as the references), clipped to the image and scaled to the original size.
Masks are the component's tokens brought to every original pixel (each pixel takes its nearest token, through
:class:`~densevit.models.grid.TokenGrid`), optionally refined by a dense CRF (``refine="crf"``; the CRF of
:mod:`densevit.apps.refine`, shared with part co-segmentation) or by TokenCut's bilateral solver
(``refine="bilateral"``, :func:`densevit.apps.refine.bilateral_solve`; reference
``unsupervised_saliency_detection/bilateral_solver.py`` with ``get_saliency.py``'s sigmas 16 / 16 / 8): the mask
at the original resolution is the solver's target (confidence 0.999 everywhere), and the refined mask is the
solver output ``> 0.5`` -- what TokenCut's saliency metrics score (its pictures additionally fill holes and keep
one component; not done here).

``fit`` chooses how the image becomes a token grid: ``"pad"`` (the references' object discovery: zero padding to
a multiple of the patch), ``"round"`` (TokenCut's saliency script: each side resized with Lanczos to the nearest
multiple of the patch size) or ``"crop"`` (densevit's usual grid: the last partial patch dropped).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image

from densevit.errors import DensevitError
from densevit.features.frames import InputRule
from densevit.features.upsampled import UpsampleOptions
from densevit.features.options import facet_opt, layer_opt
from densevit.io.images import as_pil, check_min_side
from densevit.matching.knn import similarity_matrix
from densevit.models.grid import TokenGrid
from densevit.options import opt, zero_is_none
from densevit.upsample import check_method, upsample_tokens
from densevit.features.source import ImageInput, image_name

from ..common import input_to_image, tokens_to_image
from ..refine import bilateral_solve, dense_crf

__all__ = ["METHODS", "FITS", "REFINES", "SOLVERS", "DiscoverConfig", "DiscoveryFeatures", "TokenDiscovery",
           "Discovery", "tokencut_graph", "ncut_vector", "ncut_split", "tokencut_tokens", "lost_tokens", "seed_component",
           "token_box", "extract_discovery_features", "discover_features", "discover", "discover_mask",
           "box_iou", "mask_box"]

METHODS = ("tokencut", "lost")
FITS = ("pad", "round", "crop")
REFINES = ("none", "crf", "bilateral")
SOLVERS = ("eigh", "generalized")
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)   # scipy.ndimage.label's default


@dataclass(frozen=True)
class DiscoverConfig(UpsampleOptions):
    """Discovery parameters (defaults: the papers' / reference code's).

    Attributes:
        method: ``"tokencut"`` or ``"lost"``.
        load_size: shorter image side fed to the network (``None``: the original size, as the references).
        fit: ``"pad"`` | ``"round"`` | ``"crop"`` (see the module docstring).
        layer, facet: the descriptors (last block's keys).
        tau, eps, binary_graph, solver: TokenCut's graph threshold, weight of the other edges, binary graph
            (False: the similarity ablation) and eigen-solver.
        k_patches: LOST's number of lowest-degree patches considered in the seed expansion.
        refine: ``"none"``, ``"crf"`` (dense CRF at the network input's resolution, then mapped back) or
            ``"bilateral"`` (TokenCut's bilateral solver at the original resolution; :func:`bilateral_solve`).
        crf, crf_iters, crf_confidence: CRF backend (``auto``/``dense``/``approx``), iterations, and the
            probability given to the discovered label of each pixel in the unary term.
        max_tokens: refuse grids of more tokens (the graphs are dense ``TxT``: 12000 tokens take ~1.7 GiB for
            TokenCut); large photos need a ``load_size``.
        upsample, upsample_weights: discover on upsampled features (:mod:`densevit.upsample`): the patch-stride
            map upsampled, guided by the image, to the densest grid of cells of ``patch / f`` pixels (``f`` a
            divisor of the patch) that stays within ``max_tokens`` (the graph is dense: pixels are out of reach).
    """

    method: str = opt("tokencut", "TokenCut or LOST", choices=METHODS)
    load_size: Optional[int] = opt(None, "resize the shorter image side to this (0: the original size, as the "
                                         "papers)", parse=zero_is_none)
    fit: str = opt("pad", "grid fitting: pad to a multiple of the patch (papers), round each side to one "
                          "(TokenCut's saliency script), or crop the last partial patch", choices=FITS)
    layer: int = layer_opt(-1)
    facet: str = facet_opt("key")
    tau: float = opt(0.2, "TokenCut graph threshold")
    eps: float = opt(1e-5, "TokenCut weight of edges below tau")
    binary_graph: bool = opt(True, "TokenCut ablation: similarities as edge weights above tau instead of 1",
                             flag="--no-binary-graph", invert=True)
    solver: str = opt("eigh", "eigh: symmetric-normalised standard problem; generalized: TokenCut's "
                              "eigh(D - W, D) call with a dense D (same vector, slower)", choices=SOLVERS)
    k_patches: int = opt(100, "LOST: lowest-degree patches considered in the seed expansion")
    refine: str = opt("none", "mask refinement: none, a dense CRF (pydensecrf when installed, else approximate), or "
                              "TokenCut's bilateral solver (at the original resolution)", choices=REFINES)
    crf: str = opt("auto", "CRF backend of --refine crf", cli=False)
    crf_iters: int = opt(10, "CRF mean-field iterations", cli=False)
    crf_confidence: float = opt(0.9, "CRF unary probability of the discovered label", cli=False)
    sigma_spatial: float = opt(16.0, "bilateral solver")
    sigma_luma: float = opt(16.0, "bilateral solver")
    sigma_chroma: float = opt(8.0, "bilateral solver")
    max_tokens: int = opt(12000, "refuse larger token grids (the graph is dense T x T)")

    def validate(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("fit", self.fit, FITS),
                                     ("refine", self.refine, REFINES), ("solver", self.solver, SOLVERS)):
            if value not in allowed:
                raise DensevitError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
        if self.load_size is not None and self.load_size < 1:
            raise DensevitError(f"load size must be positive, got {self.load_size}")
        if self.facet == "attn":
            raise DensevitError("facet 'attn' gives attention maps, not descriptors; use key, query, value or token")
        if not self.eps > 0:
            raise DensevitError(f"eps must be positive, got {self.eps}")
        if self.k_patches < 1:
            raise DensevitError(f"k patches must be at least 1, got {self.k_patches}")
        check_method(self.upsample, allow_none=True)
        if self.max_tokens < 1:
            raise DensevitError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not 0.5 <= self.crf_confidence < 1 or self.crf_iters < 0:
            raise DensevitError("CRF confidence must lie in [0.5, 1) and CRF iterations be >= 0")


# ------------------------------------------------------------------------------------------ token level
@dataclass
class TokenDiscovery:
    """One image's discovery on its ``h x w`` token grid (row-major flat indices).

    Attributes:
        mask: ``hxw`` bool, the seed's 4-connected component (the object).
        partition: ``hxw`` bool before the component was taken (TokenCut's bipartition; LOST's ``M > 0``).
        seed: flat token index of the seed.
        score: ``hxw`` float64 -- TokenCut: the second generalized eigenvector, oriented so the object side is
            above its mean; LOST: the inverse degree ``-degree`` (the seed has the highest score).
        expansion: LOST's ``M`` (``hxw``), None for TokenCut.
        eigenvalue: TokenCut's second smallest generalized eigenvalue, None for LOST.
    """

    mask: np.ndarray
    partition: np.ndarray
    seed: int
    score: np.ndarray
    expansion: Optional[np.ndarray] = None
    eigenvalue: Optional[float] = None


def _check_feats(feats: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    feats = torch.as_tensor(feats)
    if feats.ndim != 2 or feats.shape[0] != hw[0] * hw[1]:
        raise DensevitError(f"descriptors must be T x D with T = {hw[0]} * {hw[1]}, got {tuple(feats.shape)}")
    if feats.shape[0] < 2:
        raise DensevitError("object discovery needs at least two tokens")
    return feats


def seed_component(partition: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of ``partition`` (``hxw`` bool) holding the flat token ``seed`` (empty if the
    seed is outside the partition)."""
    labels, _ = scipy.ndimage.label(partition, structure=_FOUR_CONNECTED)
    cc = labels.reshape(-1)[seed]
    return labels == cc if cc != 0 else np.zeros_like(partition, dtype=bool)


def token_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """``(r0, c0, r1, c1)``: token rows ``[r0, r1)`` and columns ``[c0, c1)`` spanned by a non-empty ``hxw`` mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DensevitError("empty mask has no box")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def tokencut_graph(feats: torch.Tensor, tau: float = 0.2, eps: float = 1e-5, binary: bool = True) -> np.ndarray:
    """TokenCut's affinity ``TxT`` float64 of descriptors ``TxD``: cosine similarities (the index module's
    dense graph), then ``1`` where ``> tau`` and ``eps`` elsewhere (``binary=False``: the similarity where
    ``>= tau``, ``eps`` elsewhere)."""
    S = similarity_matrix(feats, metric="cosine").cpu().numpy()
    if binary:
        return np.where(S > tau, 1.0, eps)
    W = S.astype(np.float64)
    W[S < tau] = eps
    return W


def ncut_vector(W: np.ndarray, solver: str = "eigh") -> Tuple[np.ndarray, float]:
    """The second smallest generalized eigenpair of ``(D - W) x = lambda D x`` (``D = diag(W 1)``) of a
    symmetric affinity ``TxT`` with positive degrees: ``(x T float64 with x^T D x = 1, lambda)``.

    ``solver="eigh"`` solves the equivalent standard problem of ``I - D^-1/2 W D^-1/2`` (overwrites ``W``);
    ``"generalized"`` calls ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])`` as TokenCut does.
    """
    d = W.sum(axis=1)
    if not (d > 0).all():
        raise DensevitError("every token needs a positive degree in the graph")
    if solver == "generalized":
        D = np.diag(d)
        vals, vecs = scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])
        return vecs[:, 0], float(vals[0])
    if solver != "eigh":
        raise DensevitError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    r = 1.0 / np.sqrt(d)
    L = W                                         # in place: L = I - D^-1/2 W D^-1/2
    L *= r[:, None]
    L *= r[None, :]
    np.negative(L, out=L)
    L.flat[::L.shape[0] + 1] += 1.0
    vals, vecs = scipy.linalg.eigh(L, subset_by_index=[1, 1], overwrite_a=True, check_finite=False)
    return vecs[:, 0] * r, float(vals[0])


def tokencut_tokens(feats: torch.Tensor, hw: Tuple[int, int], tau: float = 0.2, eps: float = 1e-5,
                    binary_graph: bool = True, solver: str = "eigh") -> TokenDiscovery:
    """TokenCut on one image's descriptors ``TxD`` (``T = h * w``, row-major)."""
    feats = _check_feats(feats, hw)
    x, lam = ncut_vector(tokencut_graph(feats, tau, eps, binary_graph), solver)
    return ncut_split(x, hw, lam)


def ncut_split(x: np.ndarray, hw: Tuple[int, int], eigenvalue: Optional[float] = None) -> TokenDiscovery:
    """TokenCut's steps 4-5 on its eigenvector ``x`` (``T``): the bipartition ``x > mean(x)``, the seed, the
    orientation and the seed's component.

    The seed is the first maximum of ``|x|`` in token order (``np.argmax``, as TokenCut). Where two entries of
    ``|x|`` are equal only up to round-off, two correct eigensolvers can name different seeds; mostly both lie in
    the same component of the bipartition, and then give the same mask."""
    partition = x > x.sum() / len(x)
    seed = int(np.argmax(np.abs(x)))
    if not partition[seed]:
        x = -x
        partition = ~partition
    partition = partition.reshape(hw)
    return TokenDiscovery(seed_component(partition, seed), partition, seed, x.reshape(hw), None, eigenvalue)


def lost_tokens(feats: torch.Tensor, hw: Tuple[int, int], k_patches: int = 100) -> TokenDiscovery:
    """LOST on one image's descriptors ``TxD`` (``T = h * w``, row-major)."""
    feats = _check_feats(feats, hw)
    A = similarity_matrix(feats, metric="ip")                            # T x T raw correlations
    positive = A > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1).cpu().numpy()
    order = np.argsort(degree, kind="stable")                           # increasing degree, then token index
    seed = int(order[0])
    potentials = torch.from_numpy(order[:k_patches]).to(A.device)
    similars = potentials[A[seed, potentials] > 0]
    M = A[similars].sum(dim=0).cpu().numpy()
    partition = (M > 0).reshape(hw)
    mask = seed_component(partition, seed)
    if not mask.any():                                                  # cannot happen with LOST's graph
        mask.reshape(-1)[seed] = True
    return TokenDiscovery(mask, partition, seed, (-degree).astype(np.float64).reshape(hw), M.reshape(hw))


# ------------------------------------------------------------------------------------------ image level
@dataclass
class DiscoveryFeatures:
    """One image's descriptors for discovery.

    Attributes:
        name: file stem. image: the original RGB image. resized: the network input before padding.
        grid: token grid of the network input (padded for ``fit="pad"``; its pixels are input pixels).
        image_grid: the resized (unpadded) input and the original image (maps input pixels to original ones).
        descriptors: ``TxD`` float32 on the CPU.
    """

    name: str
    image: Image.Image
    resized: Image.Image
    grid: TokenGrid
    image_grid: TokenGrid
    descriptors: torch.Tensor

    @property
    def image_hw(self) -> Tuple[int, int]:
        return self.image_grid.original_hw

    def to_image(self, values: np.ndarray) -> np.ndarray:
        """Per-token values (``T``/``hxw``, optionally ``xC``) -> a map at the ORIGINAL resolution (each pixel its
        nearest token)."""
        v = np.asarray(values)
        if v.ndim >= 2 and tuple(v.shape[:2]) == tuple(self.grid.shape):
            v = v.reshape((self.grid.num_tokens,) + v.shape[2:])
        return self.input_to_image(tokens_to_image(v, self.grid, where="input"))

    def input_to_image(self, values: np.ndarray) -> np.ndarray:
        """A map over the network input (padded size allowed) -> the original resolution."""
        Hr, Wr = self.image_grid.input_hw
        return input_to_image(np.asarray(values)[:Hr, :Wr], self.image_grid)

    def box_to_image(self, box: Tuple[int, int, int, int]) -> Tuple[float, float, float, float]:
        """Token box ``(r0, c0, r1, c1)`` -> ``(x0, y0, x1, y1)`` original pixels (exclusive maxima), clipped."""
        r0, c0, r1, c1 = box
        s, p = self.grid.stride, self.grid.patch_size
        Hr, Wr = self.image_grid.input_hw
        sx, sy = self.image_grid.scale_xy
        x0, y0 = s * c0, s * r0
        x1, y1 = min(s * (c1 - 1) + p, Wr), min(s * (r1 - 1) + p, Hr)
        return float(x0 * sx), float(y0 * sy), float(x1 * sx), float(y1 * sy)


def extract_discovery_features(extractor, image: ImageInput, cfg: DiscoverConfig = DiscoverConfig(),
                               name: Optional[str] = None) -> DiscoveryFeatures:
    """Read one image, bring it to a token grid as ``cfg.fit`` says and extract ``cfg.layer``/``cfg.facet``
    descriptors in one forward pass of ``extractor``, any :class:`~densevit.features.source.FeatureSource` (a store
    serves ``fit="crop"`` at its own load size and refuses the other fits and ``upsample`` in one line)."""
    cfg.validate()
    img = as_pil(image)
    H0, W0 = img.height, img.width
    p = getattr(extractor, "patch_size", None)      # a store checked its images when it extracted them
    if cfg.fit != "round":                  # "round" brings any image to whole patches; the others need one
        check_min_side(image if isinstance(image, (str, Path)) else (name or "image"), (H0, W0), p,
                       getattr(getattr(extractor, "spec", None), "name", ""))
    rule = InputRule("round" if cfg.fit == "round" else "short_side", cfg.load_size, pad=cfg.fit == "pad")

    def check(grid: TokenGrid) -> None:
        if grid.num_tokens > cfg.max_tokens:
            what = f"{W0}x{H0} image" if cfg.load_size is None else f"image at load size {cfg.load_size}"
            s = grid.stride
            fits = int(s * math.sqrt(cfg.max_tokens * min(grid.input_hw) / max(grid.input_hw)))
            hint = (f"set a smaller load size (about --load-size {fits // s * s} fits) or " if fits >= grid.patch_size and
                    (cfg.load_size is None or fits < cfg.load_size) else "")
            raise DensevitError(f"the {what} gives {grid.shape[0]}x{grid.shape[1]} = {grid.num_tokens} tokens, "
                                f"more than the {cfg.max_tokens} allowed for a dense graph; {hint}raise --max-tokens")

    source_image = image if isinstance(image, (str, Path)) and not getattr(extractor, "runs_model", True) else img
    b = next(iter(extractor.frames_features([source_image], rule, (cfg.layer,), (cfg.facet,), batch_size=1,
                                            guide=bool(cfg.upsample), names=[name or image_name(image, 0)],
                                            check_grid=check)))
    resized = b.resized[0]
    grid = TokenGrid(b.grid.patch_size, b.grid.stride, tuple(b.grid.input_hw))
    image_grid = TokenGrid(grid.patch_size, grid.stride, (resized.height, resized.width), (H0, W0))
    desc = b.descriptors[(cfg.layer, cfg.facet)][0].float().cpu()
    if cfg.upsample:
        desc, grid = _upsampled(desc, grid, b.guide, cfg)
    return DiscoveryFeatures(name or image_name(image, 0), img, resized, grid, image_grid, desc)


def _upsampled(desc: torch.Tensor, grid: TokenGrid, guide: torch.Tensor, cfg: DiscoverConfig
               ) -> Tuple[torch.Tensor, TokenGrid]:
    """Patch-stride descriptors ``TxD`` on ``grid`` -> the densest grid of ``patch / f``-pixel cells within
    ``cfg.max_tokens`` (``f`` divides the patch), upsampled with ``cfg.upsample`` guided by the network input ``guide`` (RGB in ``[0, 1]``)."""
    p, (h, w) = grid.patch_size, grid.shape
    if grid.stride != p:
        raise DensevitError(f"--upsample discovers on upsampled patch-stride features: leave out --stride "
                            f"(got stride {grid.stride} for patch {p})")
    f = max(d for d in range(1, p + 1) if p % d == 0 and h * w * d * d <= cfg.max_tokens)
    cell = p // f
    H, W = h * p, w * p                                   # the part of the input the tokens cover
    guide = guide[..., :H, :W]
    covered = TokenGrid(p, p, (H, W))
    up, _ = upsample_tokens(desc[None].to(guide.device), covered, guide, cfg.upsample, out_size=(h * f, w * f),
                            **cfg.options())
    return up[0].float().cpu(), TokenGrid(cell, cell, tuple(grid.input_hw))


@dataclass
class Discovery:
    """The object discovered in one image.

    Attributes:
        name, method: image name and ``"tokencut"``/``"lost"``.
        mask: ``H0xW0`` bool at the ORIGINAL resolution (CRF-refined when asked).
        box: ``(x0, y0, x1, y1)`` original pixels, exclusive maxima: the box of the seed's component (tokens).
        seed_xy: the seed token's centre in original pixels.
        tokens: the token-level result (:class:`TokenDiscovery`).
        features: the image's :class:`DiscoveryFeatures` (grids, images).
        refined: whether the mask was refined; timings: seconds per stage.
    """

    name: str
    method: str
    mask: np.ndarray
    box: Tuple[float, float, float, float]
    seed_xy: Tuple[float, float]
    tokens: TokenDiscovery
    features: DiscoveryFeatures
    refined: bool = False
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.features.image

    def score_map(self) -> np.ndarray:
        """The eigenvector (TokenCut) or inverse-degree (LOST) map ``H0xW0`` float32 at the original resolution."""
        return self.features.to_image(self.tokens.score.astype(np.float32))


def _crf_mask(f: DiscoveryFeatures, token_mask: np.ndarray, cfg: DiscoverConfig) -> np.ndarray:
    """Dense-CRF refinement of a token mask at the network input's resolution -> original-resolution mask."""

    Hr, Wr = f.image_grid.input_hw
    m = tokens_to_image(token_mask.reshape(-1), f.grid, where="input")[:Hr, :Wr]
    q = np.where(m, cfg.crf_confidence, 1.0 - cfg.crf_confidence).astype(np.float32)
    unary = -np.log(np.stack([1.0 - q, q], axis=-1))
    labels, _ = dense_crf(np.asarray(f.resized.convert("RGB")), unary, cfg.crf, cfg.crf_iters)
    return f.input_to_image(labels == 1)


def discover_features(f: DiscoveryFeatures, cfg: DiscoverConfig = DiscoverConfig()) -> Discovery:
    """Run ``cfg.method`` on extracted features and bring the result to the original image."""
    cfg.validate()
    t = time.perf_counter()
    if cfg.method == "tokencut":
        tok = tokencut_tokens(f.descriptors, f.grid.shape, cfg.tau, cfg.eps, cfg.binary_graph, cfg.solver)
    else:
        tok = lost_tokens(f.descriptors, f.grid.shape, cfg.k_patches)
    timings = {cfg.method: time.perf_counter() - t}
    t = time.perf_counter()
    if cfg.refine == "crf":
        mask = _crf_mask(f, tok.mask, cfg)
        timings["crf"] = time.perf_counter() - t
    elif cfg.refine == "bilateral":
        soft = bilateral_solve(np.asarray(f.image), f.to_image(tok.mask).astype(np.float64),
                               sigma_spatial=cfg.sigma_spatial, sigma_luma=cfg.sigma_luma,
                               sigma_chroma=cfg.sigma_chroma)
        mask = soft > 0.5
        timings["bilateral"] = time.perf_counter() - t
    else:
        mask = f.to_image(tok.mask)
    seed_xy = f.image_grid.input_to_image(f.grid.token_centers_input()[tok.seed:tok.seed + 1])[0]
    return Discovery(f.name, cfg.method, mask.astype(bool), f.box_to_image(token_box(tok.mask)),
                     (float(seed_xy[0]), float(seed_xy[1])), tok, f, cfg.refine != "none", timings)


def discover(extractor, image: ImageInput, cfg: Optional[DiscoverConfig] = None, **overrides) -> Discovery:
    """Discover the main object of one image (path or PIL image) with ``extractor``; ``overrides`` replace
    fields of ``cfg`` (e.g. ``method="lost"``)."""
    cfg = replace(cfg or DiscoverConfig(), **overrides)
    t = time.perf_counter()
    f = extract_discovery_features(extractor, image, cfg)
    t_extract = time.perf_counter() - t
    result = discover_features(f, cfg)
    result.timings = {"extraction": t_extract, **result.timings}
    return result


def discover_mask(extractor, image: ImageInput, cfg: Optional[DiscoverConfig] = None, **overrides) -> np.ndarray:
    """The discovered object of one image as an id mask ``H0xW0`` uint8 (0 background, 1 object), e.g. the
    first mask of unsupervised video object segmentation."""
    return discover(extractor, image, cfg, **overrides).mask.astype(np.uint8)


# ------------------------------------------------------------------------------------------------ scoring
def mask_box(mask: np.ndarray) -> Optional[Tuple[float, float, float, float]]:
    """``(x0, y0, x1, y1)`` pixel box (exclusive maxima) of a binary mask, None when it is empty."""
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def box_iou(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (areas ``(x1 - x0) * (y1 - y0)``)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
