"""Part co-segmentation of a set of images (Amir et al. 2021, Sec. 4.2; reference ``part_cosegmentation.py``).

By default every step is the reference's ``find_part_cosegmentation`` with its defaults:

1. Foreground, as in co-segmentation (:mod:`densevit.apps.coseg` steps 1-3, no GrabCut; the same saliency
   sources, FAISS k-means arguments and ``seed``): elbow k-means of all descriptors (key facet, layer 11,
   unbinned; k = 1..14, ``elbow`` 0.975) and saliency voting (``thresh`` 0.065, ``votes_percentage`` 75 %; only
   the original images vote).
2. Parts: k-means with ``num_parts`` (4) clusters of the foreground descriptors (L2-normalised, trained on every
   100th of each image's), or with the three-stage variant (``three_stages``) an elbow k-means
   (``elbow_second_stage`` 0.94) whose clusters present in every original image after smoothing are the common
   parts, whose descriptors are clustered again into ``num_parts`` parts (stage 3).
3. Smoothing: per image, the unary energy of each token is its squared distance to every part centroid and, for
   background, the smallest squared distance to a background centroid (stage-1 non-salient clusters, plus
   stage-2 non-common ones in three stages), minus the token's maximum; brought to the resized image's pixels
   (``upsample_masks``: ``"reference"`` = ``torch.nn.Upsample(mode="nearest")`` as the reference,
   ``"token-centre"`` = nearest token centre), a dense CRF on the resized image (Gaussian kernel sxy 3, compat
   50; bilateral sxy 5, srgb 13, compat 15; 10 mean-field iterations, as the reference) gives the label map.
   In three stages the smoothed maps go back to one label per token the same way (``"reference"``: nearest
   down-sampling as the reference; ``"token-centre"``: the pixel under each token centre).
4. Optional augmentations (``num_crop_augmentations`` > 0): for each image, that many random 95 % crops of it
   and of its horizontal flip join the clustering (not the voting) and are dropped from the output (the crops
   are drawn from a generator seeded with ``seed``, not from the reference's unseeded torch stream).

Dense CRF backends (``crf``): ``"dense"`` (pydensecrf), ``"approx"`` (its documented fallback), ``"none"``
(:mod:`densevit.apps.refine`, shared with object discovery).

Output label maps are at the ORIGINAL image resolution (``parts_input``: at the resized resolution, as the
reference returns them): -1 background, parts ``0..P-1``, the same part id meaning the same part across the set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from densevit.errors import DensevitError
from densevit.runtime.progress import stage, track
from densevit.options import opt
from densevit.features.source import ImageFeatures, ImageInput, image_name

from .common import (ClusteringConfig, extract_features, input_to_image, input_to_tokens, l2_normalize,
                     tokens_to_image, upsample_nearest)
from .coseg import cluster_descriptors, vote_salient_clusters
from .refine import CRF_BACKENDS, crf_backend, dense_crf

__all__ = ["PartsegConfig", "PartsegResult", "part_cosegment", "part_cosegment_features", "extract_partseg_features",
           "augment_image"]

@dataclass(frozen=True)
class PartsegConfig(ClusteringConfig):
    """Part co-segmentation parameters (defaults: the reference's ``find_part_cosegmentation``; the k-means seed
    also draws the augmentation crops)."""

    num_parts: int = opt(4, "number of parts")
    num_crop_augmentations: int = opt(0, "random 95%% crops of each image and of its flip added to the clustering "
                                         "(helps small, varied sets)")
    crop_fraction: float = opt(0.95, "side of an augmentation crop, as a fraction of the image's", cli=False)
    three_stages: bool = opt(False, "three clustering stages (foreground, common parts, parts): for sets with "
                                    "distractors", negatable=False)
    elbow_second_stage: float = opt(0.94, "elbow coefficient of the second stage (three stages only)")
    crf: str = opt("auto", "smoothing: dense CRF (pydensecrf), its approximation, none; auto = dense if installed",
                   choices=CRF_BACKENDS)
    crf_iters: int = opt(10, "mean-field iterations")
    gaussian_sxy: float = opt(3.0, "CRF smoothness kernel: spatial sigma", cli=False)
    gaussian_compat: float = opt(50.0, "CRF smoothness kernel: weight", cli=False)
    bilateral_sxy: float = opt(5.0, "CRF appearance kernel: spatial sigma", cli=False)
    bilateral_srgb: float = opt(13.0, "CRF appearance kernel: colour sigma", cli=False)
    bilateral_compat: float = opt(15.0, "CRF appearance kernel: weight", cli=False)

    def validate(self) -> None:
        super().validate()
        if self.num_parts < 1:
            raise DensevitError(f"number of parts must be >= 1, got {self.num_parts}")
        if self.num_crop_augmentations < 0 or not 0 < self.crop_fraction <= 1:
            raise DensevitError("crop augmentations must be >= 0 and the crop fraction in (0, 1]")
        if self.crf not in CRF_BACKENDS:
            raise DensevitError(f"unknown CRF backend {self.crf!r}; choose from {', '.join(CRF_BACKENDS)}")
        if self.crf_iters < 0:
            raise DensevitError("CRF iterations must be >= 0")


@dataclass
class PartsegResult:
    """Part co-segmentation of a set (original images only, input order).

    Attributes:
        parts: per image ``H0xW0`` int16 label map at the ORIGINAL resolution: -1 background, 0..P-1 parts.
        token_parts: per image ``hxw`` int labels sampled at the token centres (after smoothing).
        num_parts: P; k_fg: stage-1 cluster count; salient: stage-1 foreground clusters.
        common: three stages only: the stage-2 clusters kept as common parts (else None).
        crf: the smoothing backend actually used ("dense", "approx" or "none").
        timings: seconds per stage.
        images: the original RGB images the label maps belong to (for drawing).
        parts_input: per image the label map at the RESIZED (network input) resolution, as the reference.
    """

    names: List[str]
    parts: List[np.ndarray]
    token_parts: List[np.ndarray]
    num_parts: int
    k_fg: int
    salient: np.ndarray
    common: Optional[np.ndarray]
    crf: str
    timings: Dict[str, float] = field(default_factory=dict)
    images: List[Image.Image] = field(default_factory=list)
    parts_input: List[np.ndarray] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- helpers
def augment_image(image: Image.Image, load_size: Optional[int], n: int, fraction: float,
                  rng: np.random.Generator) -> List[Image.Image]:
    """The reference's augmentations: the image resized to ``load_size``, and for i < n a random crop of
    ``fraction`` of each side of it and of its horizontal flip (2n images; they are resized again on input)."""
    from densevit.io.images import resize_short_side

    base = resize_short_side(image, load_size)
    flipped = base.transpose(Image.FLIP_LEFT_RIGHT)
    cw, ch = max(1, int(base.width * fraction)), max(1, int(base.height * fraction))
    out = []
    for _ in range(n):
        for src in (base, flipped):
            x0 = int(rng.integers(0, base.width - cw + 1))
            y0 = int(rng.integers(0, base.height - ch + 1))
            out.append(src.crop((x0, y0, x0 + cw, y0 + ch)))
    return out


def _sq_dists(x: torch.Tensor, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``T x K`` between rows of x (normalised) and centroids c (``K x D``), each
    ``sum((x - c)^2)`` as the reference computes it (one centroid at a time)."""
    xs = x.float().numpy()
    out = np.empty((xs.shape[0], c.shape[0]), np.float32)
    for j in range(c.shape[0]):
        out[:, j] = ((xs - c[j][None].astype(np.float32)) ** 2).sum(axis=1)
    return out


def _to_input(values: np.ndarray, f: ImageFeatures, how: str) -> np.ndarray:
    """Per-token values (``T x C``) -> the resized image's pixels (``Hi x Wi x C``), by ``how``."""
    if how == "token-centre":
        return tokens_to_image(values, f.grid, where="input")
    return upsample_nearest(values.reshape(f.grid.shape + values.shape[1:]), tuple(f.grid.input_hw))


def _to_tokens(label_map: np.ndarray, f: ImageFeatures, how: str) -> np.ndarray:
    """A label map of the resized image (``Hi x Wi``) -> one label per token (``T``), by ``how``."""
    if how == "token-centre":
        return input_to_tokens(label_map, f.grid)
    return upsample_nearest(label_map, f.grid.shape).reshape(-1).astype(label_map.dtype)


def _smooth(f: ImageFeatures, normed: torch.Tensor, part_c: np.ndarray, bg_c: np.ndarray,
            cfg: PartsegConfig) -> Tuple[np.ndarray, str]:
    """CRF label map of one image at the resized resolution: ``HixWi`` (parts 0..P-1, P = background)."""
    d_parts = _sq_dists(normed, part_c)                                       # T x P
    d_bg = _sq_dists(normed, bg_c)
    if d_bg.shape[1]:
        d_bg = d_bg.min(axis=1, keepdims=True)
    else:  # every stage-1 cluster is foreground (the reference fails): background is never the closest
        d_bg = np.full((normed.shape[0], 1), d_parts.max() + 1.0 if d_parts.size else 1.0, np.float32)
    d = np.concatenate([d_parts, d_bg], axis=1)
    d = d - d.max(axis=1, keepdims=True)
    unary = _to_input(d, f, cfg.upsample_masks)                               # Hi x Wi x (P+1)
    return dense_crf(np.asarray(f.resized), unary, cfg.crf, cfg.crf_iters, cfg.gaussian_sxy, cfg.gaussian_compat,
                     cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat)


# ---------------------------------------------------------------------------------------------- pipeline
def part_cosegment_features(features: Sequence[ImageFeatures], n_original: int,
                            cfg: PartsegConfig = PartsegConfig()) -> PartsegResult:
    """Part co-segmentation from extracted features: the first ``n_original`` are the set's images, the rest
    augmentations (used for clustering only)."""
    cfg.validate()
    if n_original < 2:
        raise DensevitError(f"part co-segmentation needs at least two images, got {n_original}")
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    stage(f"clustering the descriptors of {len(features)} images")
    mppc = cfg.max_points_per_centroid
    stage1 = cluster_descriptors([f.descriptors for f in features], cfg.elbow, cfg.k_range, cfg.sample_interval,
                                 cfg.n_iter, cfg.n_redo, cfg.seed, cfg.backend, max_points_per_centroid=mppc)
    salient, _ = vote_salient_clusters(stage1.labels[:n_original],
                                       [f.saliency.numpy() for f in features[:n_original]], stage1.k, cfg.thresh,
                                       cfg.votes_percentage)
    bg1 = np.setdiff1d(np.arange(stage1.k), salient)
    fg = [np.isin(lab, salient) for lab in stage1.labels]
    n_fg = int(sum(m.sum() for m in fg))
    if n_fg < cfg.num_parts:
        raise DensevitError(f"the foreground has {n_fg} tokens, too few for {cfg.num_parts} parts "
                            f"(try a lower --thresh or --votes-percentage)")
    fg_desc = [f.descriptors[torch.from_numpy(m)] for f, m in zip(features, fg)]
    if cfg.three_stages:
        stage2 = cluster_descriptors(fg_desc, cfg.elbow_second_stage, cfg.k_range, cfg.sample_interval,
                                     cfg.n_iter, cfg.n_redo, cfg.seed, cfg.backend, max_points_per_centroid=mppc)
    else:
        stage2 = cluster_descriptors(fg_desc, sample_interval=cfg.sample_interval, n_iter=cfg.n_iter,
                                     n_redo=cfg.n_redo, seed=cfg.seed, backend=cfg.backend, fixed_k=cfg.num_parts,
                                     max_points_per_centroid=mppc)
    timings["clustering"] = time.perf_counter() - t

    normed = [l2_normalize(f.descriptors) for f in features]
    t = time.perf_counter()
    common = None
    # Two stages: only the original images' maps are needed; three stages: every image's (stage-3 clustering).
    todo = range(len(features)) if cfg.three_stages else range(n_original)
    maps = {}
    used = "none"
    for i in track(todo, "smoothing (CRF)", "image"):
        maps[i], used = _smooth(features[i], normed[i], stage2.centroids, stage1.centroids[bg1], cfg)
    timings["crf"] = time.perf_counter() - t
    n_parts = stage2.k

    if cfg.three_stages:
        t = time.perf_counter()
        tok = {i: _to_tokens(maps[i], features[i], cfg.upsample_masks) for i in todo}  # smoothed label per token
        votes = np.zeros(stage2.k, np.int64)
        for i in range(n_original):
            present = np.unique(tok[i])
            votes[present[present < stage2.k]] += 1
        common = np.flatnonzero(votes == n_original)
        if common.size == 0:
            raise DensevitError("three stages: no part cluster is present in every image")
        keep = [np.isin(tok[i], common) for i in todo]
        if int(sum(k.sum() for k in keep)) < cfg.num_parts:
            raise DensevitError(f"three stages: too few common-part tokens for {cfg.num_parts} parts")
        stage3 = cluster_descriptors([f.descriptors[torch.from_numpy(k)] for f, k in zip(features, keep)],
                                     sample_interval=cfg.sample_interval, n_iter=cfg.n_iter, n_redo=cfg.n_redo,
                                     seed=cfg.seed, backend=cfg.backend, fixed_k=cfg.num_parts,
                                     max_points_per_centroid=mppc)
        bg = np.concatenate([stage1.centroids[bg1], stage2.centroids[np.setdiff1d(np.arange(stage2.k), common)]])
        timings["clustering"] += time.perf_counter() - t
        t = time.perf_counter()
        for i in range(n_original):
            maps[i], used = _smooth(features[i], normed[i], stage3.centroids, bg, cfg)
        timings["crf"] += time.perf_counter() - t
        n_parts = stage3.k

    parts, token_parts, parts_input = [], [], []
    for i in range(n_original):
        m = maps[i].astype(np.int16)
        m[m >= n_parts] = -1
        parts_input.append(m)
        parts.append(input_to_image(m, features[i].grid))
        token_parts.append(input_to_tokens(m, features[i].grid).reshape(features[i].grid.shape))
    return PartsegResult([f.name for f in features[:n_original]], parts, token_parts, int(n_parts), stage1.k,
                         salient, common, used, timings, [f.image for f in features[:n_original]], parts_input)


def extract_partseg_features(extractor, images: Sequence[ImageInput], cfg: PartsegConfig) -> List[ImageFeatures]:
    """Features of the set's images (one pass each, with saliency), followed by those of the augmentations."""
    names = [image_name(im, i) for i, im in enumerate(images)]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    feats = [extract_features(extractor, im, cfg.load_size, cfg.layer, cfg.facet, cfg.bin, True, False, n,
                              cfg.saliency_source) for im, n in track(list(zip(images, names)), "extracting",
                                                                      "image")]
    if cfg.num_crop_augmentations:
        rng = np.random.default_rng(cfg.seed)
        for f in track(list(feats), f"extracting {cfg.num_crop_augmentations} x 2 augmentations", "image"):
            for j, aug in enumerate(augment_image(f.image, cfg.load_size, cfg.num_crop_augmentations,
                                                  cfg.crop_fraction, rng)):
                # augmentations do not vote: no saliency
                feats.append(extract_features(extractor, aug, cfg.load_size, cfg.layer, cfg.facet, cfg.bin, False,
                                              False, f"{f.name}_aug{j}"))
    return feats


def part_cosegment(extractor, images: Sequence[ImageInput], cfg: Optional[PartsegConfig] = None, **overrides
                   ) -> PartsegResult:
    """Part co-segment a set of images (paths or PIL images); ``overrides`` replace fields of ``cfg``."""
    cfg = replace(cfg or PartsegConfig(), **overrides)
    cfg.validate()
    if len(images) < 2:
        raise DensevitError(f"part co-segmentation needs at least two images, got {len(images)}")
    crf_backend(cfg.crf)  # fail early when a missing backend is required
    t = time.perf_counter()
    feats = extract_partseg_features(extractor, images, cfg)
    t_extract = time.perf_counter() - t
    result = part_cosegment_features(feats, len(images), cfg)
    result.timings = {"extraction": t_extract, **result.timings}
    return result
