"""Semantic point correspondences between two images (Amir et al. 2021, Sec. 4.3; reference
``correspondences.py``), and dense keypoint transfer.

:func:`find_correspondences`, by default every step of the reference's ``find_correspondences`` with its
defaults:

1. One forward pass per image: descriptors (default: key facet of layer 9, log-binned, ViT-S/8 at stride 4,
   short side 224) and saliency (the last layer's CLS attention of the same pass, as the reference).
2. Best buddies (mutual nearest neighbours, cosine) over ALL tokens of the two images, then the foreground
   test (``fg_test``): ``"reference"`` keeps buddy ``(i, j)`` when A's token ``i`` is salient
   (saliency > ``thresh`` = 0.05) and ``i`` is the nearest neighbour in A of SOME salient token of B, as the
   reference's mask does (so a buddy whose B token is background can pass); ``"both"`` requires both tokens
   to be salient (``fg_a[i] and fg_b[j]``).
3. k-means (``num_pairs`` = 10 clusters) of the buddies' joined descriptors ``[d_a, d_b]``, each joined vector
   L2-normalised (``clustering``): ``"sklearn"`` = scikit-learn's ``KMeans(n_clusters, random_state=seed,
   n_init=n_redo)``, the reference's ``KMeans(n_clusters, random_state=0)`` with the ten restarts of the
   scikit-learn it pins (1.0.1); ``"faiss"`` = FAISS k-means (:func:`densevit.matching.cluster.kmeans`, ``n_redo``
   restarts, seed ``seed``): faster on many buddies, other clusters.
4. In each cluster the pair with the highest mean saliency ``(s_a + s_b) / 2`` (the first such buddy on a
   tie); pairs come back ordered by that score (the reference lists them by cluster id), at most ``num_pairs``
   (all buddies when there are fewer).

Points are token centres in each image's ORIGINAL pixels (``(x, y)``, via :class:`~densevit.models.grid.TokenGrid`);
the reference gives the same token centres as ``(y, x)`` in resized pixels.

:func:`transfer_keypoints`: each given point of image A goes to the position of its nearest-neighbour token in B
(:func:`densevit.matching.transfer.transfer_points`, the same code the SPair-71k benchmark scores).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from densevit.errors import DensevitError
from densevit.runtime.progress import stage, track
from densevit.features.options import FeatureOptions, bin_opt, layer_opt
from densevit.matching.cluster import kmeans
from densevit.matching.geoaware import GeoAwareOptions
from densevit.matching.knn import nearest_both_ways
from densevit.matching.transfer import transfer_points
from densevit.options import opt
from densevit.features.source import ImageFeatures, ImageInput, image_name

from .common import extract_features, l2_normalize

CLUSTERINGS = ("sklearn", "faiss")
FG_TESTS = ("reference", "both")

__all__ = ["CLUSTERINGS", "FG_TESTS", "CorrespondenceConfig", "Correspondences", "find_correspondences",
           "find_correspondences_features", "salient_buddies", "cluster_pairs",
           "transfer_keypoints", "transfer_keypoints_features", "pair_features", "AlignedTransfer",
           "transfer_keypoints_geoaware"]


@dataclass(frozen=True)
class CorrespondenceConfig(FeatureOptions):
    """Correspondence parameters (defaults: the paper's / reference's)."""

    layer: int = layer_opt(9)
    bin: bool = bin_opt(True)
    thresh: float = opt(0.05, "saliency threshold of both points of a pair")
    num_pairs: int = opt(10, "number of point pairs")
    n_iter: int = opt(300, "k-means iterations (scikit-learn's max_iter / FAISS niter)", cli=False)
    n_redo: int = opt(10, "k-means restarts (scikit-learn's n_init / FAISS nredo)", cli=False)
    seed: int = opt(0, "k-means seed (scikit-learn's random_state, the reference's 0; or the FAISS seed)")
    clustering: str = opt("sklearn", "k-means of the best buddies: sklearn (scikit-learn KMeans with 10 restarts, "
                                     "the reference) or faiss (FAISS k-means: faster on many buddies, other "
                                     "clusters)", choices=CLUSTERINGS)
    fg_test: str = opt("reference", "which best buddies count as foreground: reference (A's token salient and the "
                                    "nearest neighbour of some salient token of B, as the reference) or both (both "
                                    "tokens salient)", choices=FG_TESTS)
    backend: str = opt("auto", "nearest-neighbour backend (densevit.matching)", cli=False)

    def validate(self) -> None:
        if self.num_pairs < 1:
            raise DensevitError(f"number of pairs must be >= 1, got {self.num_pairs}")
        if self.n_iter < 1 or self.n_redo < 1:
            raise DensevitError("k-means iterations and restarts must be >= 1")
        if self.clustering not in CLUSTERINGS:
            raise DensevitError(f"unknown clustering {self.clustering!r}; choose from {', '.join(CLUSTERINGS)}")
        if self.fg_test not in FG_TESTS:
            raise DensevitError(f"unknown foreground test {self.fg_test!r}; choose from {', '.join(FG_TESTS)}")


@dataclass
class Correspondences:
    """Point pairs between images A and B (row i of ``points_a`` matches row i of ``points_b``).

    Attributes:
        points_a, points_b: ``Nx2`` float64 ``(x, y)`` in each image's ORIGINAL pixels (token centres).
        tokens_a, tokens_b: ``N`` flat token indices.
        saliency: ``N`` mean saliency of each pair (the ranking score, descending).
        similarity: ``N`` cosine similarity of each pair's descriptors.
        num_buddies: best-buddy pairs that passed the foreground test (before the k-means pick).
        image_hw_a, image_hw_b: original sizes ``(H, W)``.
    """

    names: Tuple[str, str]
    points_a: np.ndarray
    points_b: np.ndarray
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    saliency: np.ndarray
    similarity: np.ndarray
    num_buddies: int
    image_hw_a: Tuple[int, int]
    image_hw_b: Tuple[int, int]
    timings: Dict[str, float] = field(default_factory=dict)


def salient_buddies(fa: ImageFeatures, fb: ImageFeatures, thresh: float, fg_test: str = "reference",
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Best buddies ``(idx_a, idx_b)`` (sorted by ``idx_a``) that pass the foreground test ``fg_test``
    (:data:`FG_TESTS`, see the module docstring) at saliency threshold ``thresh``."""
    nn_ab, nn_ba = nearest_both_ways(fa.descriptors, fb.descriptors, metric="cosine", backend=backend)
    ia = torch.nonzero(nn_ba[nn_ab] == torch.arange(nn_ab.shape[0])).flatten()
    ib = nn_ab[ia]
    fg_a, fg_b = fa.saliency > thresh, fb.saliency > thresh
    if fg_test == "both":
        keep = fg_a[ia] & fg_b[ib]
    else:  # A's token salient, and the nearest neighbour in A of some salient token of B
        reached = torch.zeros_like(fg_a)
        reached[nn_ba[fg_b]] = True
        keep = fg_a[ia] & reached[ia]
    return ia[keep], ib[keep]


def cluster_pairs(joined: torch.Tensor, k: int, cfg: CorrespondenceConfig) -> np.ndarray:
    """Cluster labels (``N``) of the buddies' joined descriptors (``N x D``, each row L2-normalised here)."""
    if cfg.clustering == "faiss":
        return kmeans(l2_normalize(joined), k, n_iter=cfg.n_iter, n_redo=cfg.n_redo, seed=cfg.seed,
                      backend=cfg.backend)[0].cpu().numpy()
    from sklearn.cluster import KMeans

    x = joined.float().numpy()
    x = x / np.sqrt((x ** 2).sum(axis=1))[:, None]
    return KMeans(n_clusters=k, random_state=cfg.seed, n_init=cfg.n_redo, max_iter=cfg.n_iter).fit(x).labels_


def find_correspondences_features(fa: ImageFeatures, fb: ImageFeatures,
                                  cfg: CorrespondenceConfig = CorrespondenceConfig()) -> Correspondences:
    """Correspondences from two images' features (descriptors ``TxD`` and saliency ``T``)."""
    cfg.validate()
    if fa.saliency is None or fb.saliency is None:
        raise DensevitError("correspondences need saliency maps (extract with saliency=True)")
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    stage("best buddies and clustering")
    ia, ib = salient_buddies(fa, fb, cfg.thresh, cfg.fg_test, cfg.backend)
    timings["best_buddies"] = time.perf_counter() - t
    n_bb = int(ia.numel())

    t = time.perf_counter()
    if n_bb == 0:
        pick = np.zeros(0, np.int64)
    else:
        k = min(cfg.num_pairs, n_bb)
        if k == n_bb:
            labels = np.arange(n_bb)
        else:
            labels = cluster_pairs(torch.cat([fa.descriptors[ia], fb.descriptors[ib]], dim=1), k, cfg)
        rank = ((fa.saliency[ia] + fb.saliency[ib]) / 2).numpy()
        order = np.lexsort((np.arange(n_bb), -rank, labels))             # by cluster, best rank first
        first = np.ones(n_bb, bool)
        first[1:] = labels[order][1:] != labels[order][:-1]
        pick = order[first]
        pick = pick[np.argsort(-rank[pick], kind="stable")]
    timings["clustering"] = time.perf_counter() - t

    ta, tb = ia[pick], ib[pick]
    sal = ((fa.saliency[ta] + fb.saliency[tb]) / 2).numpy().astype(np.float64)
    sim = (l2_normalize(fa.descriptors[ta]) * l2_normalize(fb.descriptors[tb])).sum(1).numpy().astype(np.float64)
    return Correspondences((fa.name, fb.name), fa.grid.tokens_to_pixels(ta).numpy(),
                           fb.grid.tokens_to_pixels(tb).numpy(), ta.numpy(), tb.numpy(), sal, sim, n_bb,
                           fa.image_hw, fb.image_hw, timings)


def pair_features(extractor, image_a: ImageInput, image_b: ImageInput, load_size: Optional[int], layer: int,
                  facet: str, bin: bool, saliency: bool = True) -> Tuple[ImageFeatures, ImageFeatures]:
    """Both images' features, one pass each (names suffixed _a/_b when they share a stem)."""
    na, nb = image_name(image_a, 0), image_name(image_b, 1)
    if na == nb:
        na, nb = f"{na}_a", f"{nb}_b"
    fa, fb = (extract_features(extractor, im, load_size, layer, facet, bin, saliency, False, n)
              for im, n in track([(image_a, na), (image_b, nb)], "extracting", "image"))
    return fa, fb


def find_correspondences(extractor, image_a: ImageInput, image_b: ImageInput,
                         cfg: Optional[CorrespondenceConfig] = None, **overrides) -> Correspondences:
    """Up to ``num_pairs`` semantic point pairs between two images (paths or PIL images);
    ``overrides`` replace fields of ``cfg``."""
    cfg = replace(cfg or CorrespondenceConfig(), **overrides)
    cfg.validate()
    t = time.perf_counter()
    fa, fb = pair_features(extractor, image_a, image_b, cfg.load_size, cfg.layer, cfg.facet, cfg.bin, True)
    t_extract = time.perf_counter() - t
    out = find_correspondences_features(fa, fb, cfg)
    out.timings = {"extraction": t_extract, **out.timings}
    return out


def transfer_keypoints_features(fa: ImageFeatures, fb: ImageFeatures, points: np.ndarray, refine: str = "none",
                                window: int = 5, temperature: float = 0.02, backend: str = "auto"
                                ) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`transfer_keypoints` on already extracted features."""
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    out, scores = transfer_points(fa.descriptors, fb.descriptors, fa.grid, fb.grid, pts, refine=refine,
                                  window=window, temperature=temperature, backend=backend)
    return out.numpy(), scores.numpy()


def transfer_keypoints(extractor, image_a: ImageInput, image_b: ImageInput, points: np.ndarray,
                       load_size: Optional[int] = 224, layer: int = 9, facet: str = "key", bin: bool = True,
                       refine: str = "none", window: int = 5, temperature: float = 0.02, backend: str = "auto",
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Dense keypoint transfer: points ``Nx2 (x, y)`` in A's original pixels -> their nearest-neighbour positions
    in B's original pixels. Returns ``(points_b Nx2 float64, cosine similarity N float32)``; ``refine`` as
    :func:`densevit.matching.transfer.transfer_points`."""
    fa, fb = pair_features(extractor, image_a, image_b, load_size, layer, facet, bin, False)
    return transfer_keypoints_features(fa, fb, points, refine, window, temperature, backend)


@dataclass
class AlignedTransfer:
    """:func:`transfer_keypoints_geoaware`'s result: points in B's original pixels, whether the mirrored A was
    kept, and the two distances (None without pose alignment)."""

    points_b: np.ndarray
    flipped: bool
    original_dist: Optional[float]
    flip_dist: Optional[float]


def transfer_keypoints_geoaware(extractor, image_a: ImageInput, image_b: ImageInput, points: np.ndarray,
                                options: GeoAwareOptions, layer: int = 11, facet: str = "token", bin: bool = False,
                                refine: str = "window-softargmax", window: int = 5,
                                flip_table: Optional[str] = None) -> AlignedTransfer:
    """Keypoint transfer with GeoAware-SC's steps (:func:`densevit.matching.geoaware.align_and_transfer`): both
    images letterboxed to ``options.anno_size`` pixels, descriptors of ``(layer, facet)``, window soft-argmax,
    pose alignment by the mirrored A. Point ``i`` is keypoint id ``i`` of the SPair category ``flip_table`` (its
    left/right twins swap under the mirror; without a table no id swaps). ``options.masks`` (flip-mask): a folder
    with ``<stem>_mask.png`` per image (over the square canvas) or ``"saliency"``."""
    from pathlib import Path

    from densevit.features.canvas import canvas_descriptors, read_object_mask
    from densevit.io.images import as_pil
    from densevit.io.letterbox import letterbox_geometry
    from densevit.matching.geoaware import align_and_transfer
    from densevit.matching.spair_tables import FLIP

    if flip_table is not None and flip_table not in FLIP:
        raise DensevitError(f"no flip table for {flip_table!r}; choose an SPair category: {', '.join(sorted(FLIP))}")
    a, b = as_pil(image_a), as_pil(image_b)
    size = options.anno_size
    sal = options.pose_align == "flip-mask" and options.masks == "saliency"
    if options.pose_align == "flip-mask" and not options.masks:
        raise DensevitError("--pose-align flip-mask needs --masks (a folder of <image>_mask.png, or saliency)")
    run = lambda img, flipped=False: canvas_descriptors(extractor, img, size, layer, facet, bin, flipped, sal)
    (da, sa), (db, sb) = run(a), run(b)
    df = sf = masks = None
    if options.pose_align != "none":
        df, sf = run(a, True)
        if options.pose_align == "flip-mask":
            if sal:
                masks = (sa, sf, sb)
            else:
                def mask(image: ImageInput, flipped: bool = False) -> torch.Tensor:
                    stem = Path(str(image)).stem if isinstance(image, (str, Path)) else "image"
                    return read_object_mask(Path(options.masks) / stem, flipped)
                masks = (mask(image_a), mask(image_a, True), mask(image_b))
    geo_a, geo_b = letterbox_geometry(a.size, size), letterbox_geometry(b.size, size)
    pts = geo_a.to_canvas(torch.from_numpy(np.asarray(points, dtype=np.float64).reshape(-1, 2)))
    table = FLIP.get(flip_table, []) if flip_table else []
    vis = torch.ones(pts.shape[0], dtype=torch.bool)
    out, flipped, d0, d1 = align_and_transfer(da, df, db, pts, vis, table, size, options.pose_align, refine, window,
                                              masks=masks)
    return AlignedTransfer(geo_b.to_image(out).numpy(), flipped, d0, d1)
