"""Co-segmentation of a set of images (Amir et al. 2021, Sec. 4.1; reference ``cosegmentation.py``).

By default every step is the reference's ``find_cosegmentation`` with its defaults:

1. One forward pass per image gives its descriptors (default: key facet of layer 11, unbinned, ViT-S/8 at
   stride 4, short side 224). Saliency (``saliency_source``, :data:`~densevit.apps.common.SALIENCY_SOURCES`):
   ``"reference"`` = the reference's ``low_res_saliency_maps=True``: the last layer's CLS attention of a second
   pass at stride 8 on the image resized to half the input, resized to the token grid (nearest);
   ``"same-pass"`` = the CLS attention of the descriptor pass (the reference with ``low_res_saliency_maps=False``;
   one pass fewer).
2. All descriptors of the set, L2-normalised, are clustered with FAISS k-means with the reference's arguments
   (``faiss.Kmeans(niter=300, nredo=10)``: FAISS's seed 1234 and its cap of 256 training rows per centroid,
   :func:`densevit.matching.cluster.kmeans`); k is chosen by the elbow rule (k = 1..14, stop at the first k whose mean
   squared distance exceeds ``elbow`` = 0.975 times the previous one, and keep that k's clustering); the
   centroids are trained on every ``sample_interval``-th (100) descriptor of each image and every descriptor is
   then assigned by a search of the centroid index.
3. Each image votes for every cluster whose mean saliency over the image's tokens in it exceeds ``thresh``
   (0.065); a cluster with at least ``ceil(n_images * votes_percentage / 100)`` votes (75 %) is foreground.
4. Each image's foreground tokens are brought to the resized image's pixels (``upsample_masks``,
   :data:`~densevit.apps.common.UPSAMPLINGS`: ``"reference"`` = PIL's nearest resize of the token mask, as the
   reference; ``"token-centre"`` = nearest token centre) and seed GrabCut (OpenCV, 5 iterations): the
   7x7-eroded foreground is sure foreground, the 7x7-eroded background sure background, the rest probable
   foreground. When GrabCut cannot run (e.g. an empty mask) the unrefined mask is kept, as the reference.
   GrabCut draws from OpenCV's random generator: the reference never seeds it, so one stream runs through the
   images in order. ``grabcut_seeding="set"`` (default) seeds that stream once per set with ``grabcut_seed``
   (0: OpenCV's initial state, what an unseeded process such as the reference's draws) and the images draw from
   it in order, as the reference; ``"image"`` reseeds it before every image (an image's mask then does not
   depend on the other images of the set).
5. Optional outlier images (``remove_outliers``): images whose CLS descriptor (same layer/facet) has cosine
   similarity below ``outliers_thresh`` (0.7) to the mean CLS descriptor are left out of clustering and voting
   and get an empty mask.

Masks are returned at the ORIGINAL image resolution (GrabCut runs at the resized resolution as in the
reference, ``masks_input``; the mask is then mapped back through the token grid's scale).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.errors import DensevitError
from densevit.runtime.progress import stage, track
from densevit.matching.cluster import (
    FAISS_KMEANS_SEED,
    FAISS_MAX_POINTS_PER_CENTROID,
    elbow_kmeans,
    kmeans,
)
from densevit.options import opt
from densevit.features.source import ImageFeatures, ImageInput

from .common import ClusteringConfig, extract_set, input_to_image, l2_normalize, mask_to_input

__all__ = ["CosegConfig", "CosegResult", "GRABCUT_SEEDINGS", "Clustering", "cosegment", "cosegment_features", "cluster_descriptors",
           "vote_salient_clusters", "find_outliers", "grabcut_refine"]


GRABCUT_SEEDINGS = ("set", "image")


@dataclass(frozen=True)
class CosegConfig(ClusteringConfig):
    """Co-segmentation parameters (defaults: the reference's ``find_cosegmentation``)."""

    remove_outliers: bool = opt(False, "leave out images whose CLS descriptor is far from the set's mean (they get "
                                       "empty masks)", negatable=False)
    outliers_thresh: float = opt(0.7, "cosine similarity to the mean CLS descriptor below which an image is an "
                                      "outlier")
    grabcut: bool = opt(True, "skip the GrabCut refinement", flag="--no-grabcut", invert=True)
    grabcut_iters: int = opt(5, "GrabCut iterations", cli=False)
    grabcut_kernel: int = opt(7, "erosion kernel side for GrabCut's sure foreground / background seeds", cli=False)
    grabcut_seed: int = opt(0, "seed of OpenCV's random generator for GrabCut (0: its initial state, what the "
                               "unseeded reference draws)")
    grabcut_seeding: str = opt("set", "set: seed once per set, the images draw from one stream in order (the "
                                      "reference); image: reseed before each image (a mask does not depend on the "
                                      "set's other images)", choices=GRABCUT_SEEDINGS)

    def validate(self) -> None:
        super().validate()
        if self.grabcut_iters < 1:
            raise DensevitError(f"GrabCut iterations must be >= 1, got {self.grabcut_iters}")
        if self.grabcut_kernel < 1:
            raise DensevitError(f"GrabCut kernel must be >= 1, got {self.grabcut_kernel}")
        if self.grabcut_seeding not in GRABCUT_SEEDINGS:
            raise DensevitError(f"unknown GrabCut seeding {self.grabcut_seeding!r}; choose from "
                                f"{', '.join(GRABCUT_SEEDINGS)}")


@dataclass
class Clustering:
    """k-means of a set's normalised descriptors: per-image token labels, centroids, chosen k."""

    labels: List[np.ndarray]            # per image: T_i int64 cluster id
    centroids: np.ndarray               # k x D float32 (in the normalised descriptor space)
    k: int


@dataclass
class CosegResult:
    """Co-segmentation of a set (lists are in input order).

    Attributes:
        names: image names (file stems).
        masks: per image ``H0xW0`` bool foreground mask at the ORIGINAL resolution.
        token_masks: per image ``hxw`` bool foreground tokens (before GrabCut).
        labels: per image ``hxw`` int cluster ids (-1 for outlier images).
        k: number of clusters; salient: foreground cluster ids; votes: ``k`` vote counts.
        inliers: per image bool (all True without outlier removal).
        grabcut_applied: per image whether GrabCut refined the mask.
        timings: seconds spent per stage (extraction, clustering, voting, grabcut).
        images: the original RGB images the masks belong to (for drawing).
        masks_input: per image the mask at the RESIZED (network input) resolution, as the reference returns it.
    """

    names: List[str]
    masks: List[np.ndarray]
    token_masks: List[np.ndarray]
    labels: List[np.ndarray]
    k: int
    salient: np.ndarray
    votes: np.ndarray
    inliers: np.ndarray
    grabcut_applied: List[bool]
    timings: Dict[str, float] = field(default_factory=dict)
    clustering: Optional[Clustering] = None
    images: List[Image.Image] = field(default_factory=list)
    masks_input: List[np.ndarray] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ stages
def cluster_descriptors(descriptors: Sequence[torch.Tensor], elbow: float = 0.975,
                        k_range: Sequence[int] = tuple(range(1, 15)), sample_interval: int = 100,
                        n_iter: int = 300, n_redo: int = 10, seed: int = FAISS_KMEANS_SEED, backend: str = "auto",
                        fixed_k: Optional[int] = None,
                        max_points_per_centroid: Optional[int] = FAISS_MAX_POINTS_PER_CENTROID) -> Clustering:
    """Elbow k-means (or k = ``fixed_k``) of several images' descriptors together, as the reference.

    descriptors: per image ``T_i x D``. They are L2-normalised; the centroids are fitted on every
    ``sample_interval``-th row of each image (all rows when that leaves fewer rows than clusters, where the
    reference would fail), and every row is assigned. FAISS arguments as :func:`densevit.matching.cluster.kmeans`.
    Returns per-image labels in input order.
    """
    normed = [l2_normalize(d) for d in descriptors]
    counts = [d.shape[0] for d in normed]
    if sum(counts) == 0:
        raise DensevitError("no descriptors to cluster")
    x = torch.cat(normed)
    train = torch.cat([d[::sample_interval] for d in normed])
    k_needed = fixed_k if fixed_k is not None else min(k_range)
    if train.shape[0] < max(k_needed, 2 if fixed_k is None else 1):
        train = x
    if fixed_k is not None:
        if fixed_k > x.shape[0]:
            raise DensevitError(f"cannot form {fixed_k} clusters from {x.shape[0]} descriptors")
        labels, cents, _ = kmeans(x, fixed_k, n_iter=n_iter, n_redo=n_redo, seed=seed, backend=backend, train=train,
                                  max_points_per_centroid=max_points_per_centroid)
        k = fixed_k
    else:
        labels, cents, k = elbow_kmeans(x, k_range=k_range, elbow=elbow, seed=seed, n_iter=n_iter, n_redo=n_redo,
                                        train=train, select="stop", backend=backend,
                                        max_points_per_centroid=max_points_per_centroid)
    split = torch.split(labels.cpu(), counts)
    return Clustering([s.numpy() for s in split], cents.float().cpu().numpy(), int(k))


def vote_salient_clusters(labels: Sequence[np.ndarray], saliency: Sequence[np.ndarray], k: int, thresh: float,
                          votes_percentage: float) -> Tuple[np.ndarray, np.ndarray]:
    """Saliency voting: image i votes for cluster c when the mean saliency of its tokens in c exceeds ``thresh``
    (no vote when it has none); clusters with ``>= ceil(n * votes_percentage / 100)`` votes are salient.

    Returns ``(salient cluster ids, votes k)``.
    """
    votes = np.zeros(k, dtype=np.int64)
    for lab, sal in zip(labels, saliency):
        n = np.bincount(lab, minlength=k)
        s = np.bincount(lab, weights=np.asarray(sal, dtype=np.float64), minlength=k)
        mean = np.divide(s, n, out=np.full(k, -np.inf), where=n > 0)
        votes += mean > thresh
    needed = math.ceil(len(labels) * votes_percentage / 100)
    return np.flatnonzero(votes >= needed), votes


def find_outliers(cls_descriptors: torch.Tensor, thresh: float = 0.7) -> np.ndarray:
    """Inlier flags (N bool): cosine similarity of each CLS descriptor (``NxD``) to their mean ``>= thresh``."""
    c = cls_descriptors.float()
    sims = F.cosine_similarity(c, c.mean(0, keepdim=True), dim=1)
    return (sims >= thresh).cpu().numpy()


def grabcut_refine(image_rgb: np.ndarray, mask: np.ndarray, iters: int = 5, kernel: int = 7,
                   seed: Optional[int] = 0) -> Tuple[np.ndarray, bool]:
    """Refine a binary mask (``HxW``) of an RGB image (``HxWx3`` uint8) with GrabCut, seeded as the reference:
    eroded foreground = sure fg, eroded background = sure bg, the rest probable fg.

    Returns ``(mask HxW bool, applied)``; when GrabCut cannot run (no fg or bg samples), the input mask and
    False, and nothing is drawn from OpenCV's generator (as OpenCV's own refusal). ``seed``: OpenCV's RNG is
    seeded with it first (deterministic on its own); None draws from the generator's current state (one
    stream over several calls, as the reference, which never seeds it).
    """
    m = mask.astype(np.uint8)
    k = np.ones((kernel, kernel), np.uint8)
    sure_fg = cv2.erode(m, k).astype(bool)
    sure_bg = cv2.erode(1 - m, k).astype(bool)
    gc = np.full(m.shape, cv2.GC_PR_FGD, np.uint8)
    gc[sure_bg] = cv2.GC_BGD
    gc[sure_fg] = cv2.GC_FGD
    if not (gc != cv2.GC_BGD).any() or not (gc == cv2.GC_BGD).any():
        return mask.astype(bool), False
    if seed is not None:
        cv2.setRNGSeed(int(seed))
    try:
        cv2.grabCut(np.ascontiguousarray(image_rgb, dtype=np.uint8), gc, None, np.zeros((1, 65), np.float64),
                    np.zeros((1, 65), np.float64), int(iters), cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return mask.astype(bool), False
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD), True


# ---------------------------------------------------------------------------------------------- pipeline
def cosegment_features(features: Sequence[ImageFeatures], cfg: CosegConfig = CosegConfig()) -> CosegResult:
    """Co-segment images whose features (with saliency; with CLS descriptors for outlier removal) are given
    (their saliency is used as it is: ``cfg.saliency_source`` applies in :func:`cosegment`'s extraction)."""
    cfg.validate()
    if len(features) < 2:
        raise DensevitError(f"co-segmentation needs at least two images, got {len(features)}")
    timings: Dict[str, float] = {}
    n = len(features)
    if cfg.remove_outliers:
        if any(f.cls is None for f in features):
            raise DensevitError("outlier removal needs CLS descriptors (extract with include_cls)")
        inliers = find_outliers(torch.stack([f.cls for f in features]), cfg.outliers_thresh)
        if inliers.sum() < 1:
            raise DensevitError("every image was found to be an outlier")
    else:
        inliers = np.ones(n, dtype=bool)
    inl = [f for f, keep in zip(features, inliers) if keep]

    t = time.perf_counter()
    stage(f"clustering the descriptors of {len(inl)} images")
    clus = cluster_descriptors([f.descriptors for f in inl], cfg.elbow, cfg.k_range, cfg.sample_interval,
                               cfg.n_iter, cfg.n_redo, cfg.seed, cfg.backend,
                               max_points_per_centroid=cfg.max_points_per_centroid)
    timings["clustering"] = time.perf_counter() - t

    t = time.perf_counter()
    salient, votes = vote_salient_clusters(clus.labels, [f.saliency.numpy() for f in inl], clus.k, cfg.thresh,
                                           cfg.votes_percentage)
    timings["voting"] = time.perf_counter() - t

    t = time.perf_counter()
    masks, masks_input, token_masks, labels, applied = [], [], [], [], []
    if cfg.grabcut and cfg.grabcut_seeding == "set":
        cv2.setRNGSeed(int(cfg.grabcut_seed))           # one stream through the set, drawn in image order
    per_image_seed = cfg.grabcut_seed if cfg.grabcut_seeding == "image" else None
    it = iter(clus.labels)
    for f, keep in track(list(zip(features, inliers)), "GrabCut" if cfg.grabcut else "masks", "image"):
        h, w = f.grid.shape
        if not keep:
            token_masks.append(np.zeros((h, w), bool))
            labels.append(np.full((h, w), -1, np.int64))
            masks_input.append(np.zeros(tuple(f.grid.input_hw), bool))
            masks.append(np.zeros(f.image_hw, bool))
            applied.append(False)
            continue
        lab = next(it)
        tok = np.isin(lab, salient)
        token_masks.append(tok.reshape(h, w))
        labels.append(lab.reshape(h, w))
        pix = mask_to_input(tok, f.grid, cfg.upsample_masks)                # resized-image pixels
        ok = False
        if cfg.grabcut:
            pix, ok = grabcut_refine(np.asarray(f.resized), pix, cfg.grabcut_iters, cfg.grabcut_kernel,
                                     per_image_seed)
        applied.append(ok)
        masks_input.append(pix)
        masks.append(input_to_image(pix, f.grid))
    timings["grabcut" if cfg.grabcut else "masks"] = time.perf_counter() - t
    return CosegResult([f.name for f in features], masks, token_masks, labels, clus.k, salient, votes, inliers,
                       applied, timings, clus, [f.image for f in features], masks_input)


def cosegment(extractor, images: Sequence[ImageInput], cfg: Optional[CosegConfig] = None, **overrides
              ) -> CosegResult:
    """Co-segment a set of images (paths or PIL images) with ``extractor``; ``overrides`` replace fields of
    ``cfg`` (e.g. ``thresh=0.1``). Returns a :class:`CosegResult` with one original-resolution mask per image."""
    cfg = replace(cfg or CosegConfig(), **overrides)
    cfg.validate()
    if len(images) < 2:
        raise DensevitError(f"co-segmentation needs at least two images, got {len(images)}")
    t = time.perf_counter()
    feats = extract_set(extractor, images, cfg.load_size, cfg.layer, cfg.facet, cfg.bin, saliency=True,
                        include_cls=cfg.remove_outliers, saliency_source=cfg.saliency_source)
    t_extract = time.perf_counter() - t
    result = cosegment_features(feats, cfg)
    result.timings = {"extraction": t_extract, **result.timings}
    return result
