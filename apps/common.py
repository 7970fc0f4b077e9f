"""What the image applications share: one forward pass per image, and token maps brought to pixels.

Every pixel <-> token conversion goes through :class:`densevit.models.grid.TokenGrid`; the helpers here only apply
it along each image axis (the mapping is separable), so full-resolution maps cost one gather.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.errors import DensevitError
from densevit.features.options import FeatureOptions
from densevit.features.source import FeatureSource, ImageFeatures, ImageInput, image_name
from densevit.runtime.progress import track
from densevit.matching.cluster import FAISS_KMEANS_SEED, FAISS_MAX_POINTS_PER_CENTROID
from densevit.models.grid import TokenGrid
from densevit.options import opt, zero_is_none

SALIENCY_SOURCES = ("reference", "same-pass")
"""Where co-segmentation's saliency comes from. ``"reference"``: the reference's default
(``low_res_saliency_maps=True``): a second, small pass at stride = patch size on the image resized to half the
network input (:meth:`ViTExtractor.reference_saliency <densevit.features.extractor.ViTExtractor.reference_saliency>`), brought to the descriptor grid by nearest resizing. ``"same-pass"``:
the CLS attention of the descriptor pass itself (the reference with ``low_res_saliency_maps=False``): one forward
pass fewer per image, and the saliency at the descriptors' own resolution."""
UPSAMPLINGS = ("reference", "token-centre")
"""How token maps become pixel maps of the resized image. ``"reference"``: as the reference apps (a PIL nearest
resize of the token map to the resized image for co-segmentation masks; ``torch.nn.Upsample(mode="nearest")`` of
the CRF unaries for part co-segmentation). ``"token-centre"``: every pixel takes the token whose centre is nearest
(:class:`~densevit.models.grid.TokenGrid`; the grid's geometry, the same rule as every other densevit map)."""


@dataclass(frozen=True)
class ClusteringConfig(FeatureOptions):
    """What co-segmentation and part co-segmentation share (defaults: the reference's): the descriptors (key
    facet of layer 11, unbinned, load size 224), the k-means of every set's descriptors, the saliency votes, and
    how token maps become pixels."""

    thresh: float = opt(0.065, "saliency threshold of a cluster vote")
    elbow: float = opt(0.975, "elbow coefficient for choosing k")
    k_range: Tuple[int, ...] = opt(tuple(range(1, 15)), "cluster counts tried", cli=False)
    votes_percentage: float = opt(75.0, "%% of images that must vote for a cluster to make it foreground")
    sample_interval: int = opt(100, "fit k-means on every n-th descriptor of each image")
    n_iter: int = opt(300, "k-means iterations (the reference's FAISS niter)", cli=False)
    n_redo: int = opt(10, "k-means restarts (the reference's FAISS nredo)", cli=False)
    seed: int = opt(FAISS_KMEANS_SEED, "k-means seed (FAISS's own, as the reference)")
    max_points_per_centroid: Optional[int] = opt(
        FAISS_MAX_POINTS_PER_CENTROID, "FAISS k-means trains on a random subsample of at most this many rows per "
        "centroid (FAISS's default, as the reference); 0: train on every sampled descriptor", parse=zero_is_none)
    saliency_source: str = opt(
        "reference", "reference: saliency from a second, stride-8 pass on the half-size image (the reference's "
        "low_res_saliency_maps); same-pass: the CLS attention of the descriptor pass (one forward pass fewer; needed "
        "with --store)", choices=SALIENCY_SOURCES)
    upsample_masks: str = opt(
        "reference", "token map -> pixels of the resized image: reference (nearest resize, as the reference) or "
        "token-centre (each pixel takes the token whose centre is nearest)", choices=UPSAMPLINGS)
    backend: str = opt("auto", "nearest-neighbour / k-means backend (densevit.matching)", cli=False)

    def validate(self) -> None:
        """One-line errors for the shared parameters (the k-means cap, saliency source, up-sampling rule)."""
        if not 0 < self.votes_percentage <= 100:
            raise DensevitError(f"votes percentage must be in (0, 100], got {self.votes_percentage}")
        if self.sample_interval < 1 or self.n_iter < 1 or self.n_redo < 1:
            raise DensevitError("sample interval and k-means iterations/restarts must be >= 1")
        if not self.k_range or min(self.k_range) < 1:
            raise DensevitError("k range must hold positive cluster counts")
        check_clustering_options(self.max_points_per_centroid, self.saliency_source, self.upsample_masks)


def extract_features(source: FeatureSource, image: ImageInput, load_size: Optional[int], layer: int, facet: str,
                     bin: bool = False, saliency: bool = True, include_cls: bool = False,
                     name: Optional[str] = None, saliency_source: str = "same-pass") -> ImageFeatures:
    """One image's descriptors (and saliency / CLS descriptor): ONE forward pass of an extractor, or read from a
    :class:`~densevit.storage.store.FeatureStore` (whose load size applies: ``load_size`` is then ignored).
    ``saliency_source`` (:data:`SALIENCY_SOURCES`): ``"reference"`` adds the reference's low-resolution saliency
    pass (extractors only)."""
    if facet == "attn":
        raise DensevitError("facet 'attn' gives attention maps, not descriptors; use key, query, value or token")
    if saliency_source not in SALIENCY_SOURCES:
        raise DensevitError(f"unknown saliency source {saliency_source!r}; choose from {', '.join(SALIENCY_SOURCES)}")
    low_res = saliency and saliency_source == "reference"
    if low_res and not source.runs_model:
        raise DensevitError("a feature store holds the saliency of its own pass only: use the saliency "
                            "source 'same-pass' (--saliency-source same-pass) with a store")
    f = source.image_features(image, load_size, layer, facet, bin=bin, saliency=saliency and not low_res,
                              include_cls=include_cls, name=name)
    if low_res:
        f.saliency = source.reference_saliency(f.image, f.grid, load_size)
    return f


def extract_set(source: FeatureSource, images: Sequence[ImageInput], load_size: Optional[int], layer: int,
                facet: str, bin: bool = False, saliency: bool = True, include_cls: bool = False,
                saliency_source: str = "same-pass") -> list:
    """:func:`extract_features` for each image (names made unique by index when stems repeat)."""
    names = [image_name(im, i) for i, im in enumerate(images)]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return [extract_features(source, im, load_size, layer, facet, bin, saliency, include_cls, n, saliency_source)
            for im, n in track(list(zip(images, names)), "extracting", "image")]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32)."""
    return F.normalize(x.float(), dim=-1)


# ----------------------------------------------------------------------------------- token maps -> pixels
def _input_grid(grid: TokenGrid) -> TokenGrid:
    """The same grid with the resized input as its 'original' image (maps resized-image pixels)."""
    return dataclasses.replace(grid, image_hw=tuple(grid.input_hw))


def tokens_to_image(values: np.ndarray, grid: TokenGrid, where: str = "image") -> np.ndarray:
    """Per-token values (``T`` or ``TxC``, row-major) -> a pixel map (``HxW`` or ``HxWxC``), each pixel taking
    its nearest token's value. ``where``: ``"image"`` (original pixels) or ``"input"`` (resized pixels)."""
    g = grid if where == "image" else _input_grid(grid)
    rows, cols = (t.numpy() for t in g.pixel_tokens())
    h, w = grid.shape
    v = np.asarray(values)
    v = v.reshape((h, w) + v.shape[1:])
    return v[rows[:, None], cols[None, :]]


def check_upsampling(how: str) -> None:
    if how not in UPSAMPLINGS:
        raise DensevitError(f"unknown mask up-sampling {how!r}; choose from {', '.join(UPSAMPLINGS)}")


def check_clustering_options(max_points_per_centroid, saliency_source: str, upsample: str) -> None:
    """The checks co-segmentation and part co-segmentation share: the k-means training cap, the saliency source
    (:data:`SALIENCY_SOURCES`) and the up-sampling rule (:data:`UPSAMPLINGS`); one-line errors."""
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise DensevitError(f"max points per centroid must be >= 1, got {max_points_per_centroid}")
    if saliency_source not in SALIENCY_SOURCES:
        raise DensevitError(f"unknown saliency source {saliency_source!r}; choose from {', '.join(SALIENCY_SOURCES)}")
    check_upsampling(upsample)


def mask_to_input(mask: np.ndarray, grid: TokenGrid, how: str = "reference") -> np.ndarray:
    """A token mask (``T`` or ``hxw`` bool) -> the resized input's pixels (``HixWi`` bool). ``how``
    (:data:`UPSAMPLINGS`): ``"reference"`` resizes the ``hxw`` boolean image with PIL (a 1-bit image, which PIL
    always resizes with its nearest filter), as ``cosegmentation.py``; ``"token-centre"``: nearest token centre."""
    check_upsampling(how)
    if how == "token-centre":
        return tokens_to_image(np.asarray(mask).reshape(-1), grid, where="input")
    Hi, Wi = grid.input_hw
    img = Image.fromarray(np.ascontiguousarray(np.asarray(mask, dtype=bool).reshape(grid.shape)))
    return np.asarray(img.resize((Wi, Hi), Image.NEAREST), dtype=bool)


def upsample_nearest(values: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """``hxwxC`` (float) -> ``HxWxC`` by ``torch.nn.Upsample(size=out_hw)`` (mode "nearest": source index
    ``floor(i * h / H)``), as ``part_cosegmentation.py`` up-samples its CRF unaries (and, with ``out_hw`` the
    token grid, brings its smoothed label maps back to tokens)."""
    v = np.asarray(values)
    flat = v.reshape(v.shape[0], v.shape[1], -1)
    t = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(int(s) for s in out_hw), mode="nearest")[0].permute(1, 2, 0).numpy()
    return out.reshape(tuple(out_hw) + v.shape[2:])


def input_to_image(values: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """A map at the resized input resolution (``HixWi[...]``) -> original resolution (nearest), through
    ``grid.image_to_input`` of each original pixel centre."""
    H0, W0 = grid.original_hw
    Hi, Wi = grid.input_hw
    xs = torch.arange(W0, dtype=torch.float64) + 0.5
    ys = torch.arange(H0, dtype=torch.float64) + 0.5
    cols = grid.image_to_input(torch.stack([xs, torch.zeros_like(xs)], 1))[:, 0].floor().clamp(0, Wi - 1).long()
    rows = grid.image_to_input(torch.stack([torch.zeros_like(ys), ys], 1))[:, 1].floor().clamp(0, Hi - 1).long()
    return np.asarray(values)[rows.numpy()[:, None], cols.numpy()[None, :]]


def input_to_tokens(values: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """A map at the resized input resolution -> one value per token (``T[...]``): the input pixel under each
    token centre."""
    centres = grid.token_centers_input()                      # Tx2 (x, y) resized pixels
    Hi, Wi = grid.input_hw
    c = centres[:, 0].floor().clamp(0, Wi - 1).long().numpy()
    r = centres[:, 1].floor().clamp(0, Hi - 1).long().numpy()
    return np.asarray(values)[r, c]
