"""What the image applications share: one forward pass per image, and token maps brought to pixels.

Every pixel <-> token conversion goes through :class:`densevit.coords.TokenGrid`; the helpers here only apply
it along each image axis (the mapping is separable), so full-resolution maps cost one gather.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.coords import TokenGrid
from densevit.errors import DensevitError
from densevit.extractor import ViTExtractor
from densevit.preprocess import load_image, load_resized, resize_short_side
from densevit.store import FeatureStore

ImageInput = Union[str, Path, Image.Image]
# Where an application's features come from: a forward pass of the extractor, or a feature store's reads
# (``densevit-extract --store``; its backbone, weights, stride and load size apply).
FeatureSource = Union[ViTExtractor, FeatureStore]


@dataclass
class ImageFeatures:
    """One image's descriptors and saliency from a single forward pass.

    Attributes:
        name: file stem (or ``"image<i>"`` for in-memory images).
        image: the original RGB image; resized: the network input before normalisation (load size).
        grid: token layout (``T = h * w`` tokens, row-major).
        descriptors: ``TxD`` float32 on the CPU (not normalised).
        saliency: ``T`` in [0, 1] (CLS attention of the last layer), or None.
        cls: ``D`` CLS descriptor of the same layer/facet (unbinned), or None.
    """

    name: str
    image: Image.Image
    resized: Image.Image
    grid: TokenGrid
    descriptors: torch.Tensor
    saliency: Optional[torch.Tensor] = None
    cls: Optional[torch.Tensor] = None

    @property
    def image_hw(self) -> Tuple[int, int]:
        return self.grid.original_hw


def image_name(image: ImageInput, index: int) -> str:
    """A readable name for an input: the file stem, or ``image<index>``."""
    return Path(image).stem if isinstance(image, (str, Path)) else f"image{index}"


def extract_features(source: FeatureSource, image: ImageInput, load_size: Optional[int], layer: int, facet: str,
                     bin: bool = False, saliency: bool = True, include_cls: bool = False,
                     name: Optional[str] = None) -> ImageFeatures:
    """One image's descriptors (and saliency / CLS descriptor): ONE forward pass of an extractor, or read from a
    :class:`~densevit.store.FeatureStore` (whose load size applies: ``load_size`` is then ignored)."""
    if facet == "attn":
        raise DensevitError("facet 'attn' gives attention maps, not descriptors; use key, query, value or token")
    if isinstance(source, FeatureStore):
        return read_features(source, image, layer, facet, bin, saliency, include_cls, name)
    img = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    x, grid, resized = source.preprocess_with_image(img, load_size)
    feats = source.extract(x, (layer,), (facet,), bin=bin, saliency=saliency, image_hw=grid.image_hw)
    desc = feats.descriptors[(layer, facet)][0].float()
    cls = feats.cls[(layer, facet)][0].float().cpu() if include_cls else None
    sal = feats.saliency[0].float().cpu() if feats.saliency is not None else None
    return ImageFeatures(name or image_name(image, 0), img, resized, grid, desc.cpu(), sal, cls)


def read_features(store: FeatureStore, image: ImageInput, layer: int, facet: str, bin: bool = False,
                  saliency: bool = True, include_cls: bool = False, name: Optional[str] = None) -> ImageFeatures:
    """:func:`extract_features` from a store: stored descriptors (log-binned now when ``bin``), saliency and CLS
    descriptor; the image read and resized as the extraction did (the store's load size and decoding)."""
    if not isinstance(image, (str, Path)):
        raise DensevitError("a feature store holds features of image files only, not of images made in memory "
                            "(such as augmentations)")
    grid = store.grid(image)                      # a one-line StoreError when the image is not in the store
    img = load_image(image)
    if (img.height, img.width) != tuple(grid.original_hw):
        raise DensevitError(f"{image} is {img.width}x{img.height} pixels but was {grid.original_hw[1]}x"
                            f"{grid.original_hw[0]} when store {store.root} was made; re-extract it")
    load_size = store.settings.get("load_size") or None
    if store.settings.get("fast_decode") and load_size is not None:
        resized = load_resized(image, load_size, fast_jpeg=True)[0]
    else:
        resized = resize_short_side(img, load_size)
    desc = store.descriptors(image, layer, facet, bin=bin)
    sal = store.saliency(image) if saliency else None
    cls = store.cls(image, layer, facet) if include_cls else None
    return ImageFeatures(name or image_name(image, 0), img, resized, grid, desc, sal, cls)


def extract_set(source: FeatureSource, images: Sequence[ImageInput], load_size: Optional[int], layer: int,
                facet: str, bin: bool = False, saliency: bool = True, include_cls: bool = False) -> list:
    """:func:`extract_features` for each image (names made unique by index when stems repeat)."""
    names = [image_name(im, i) for i, im in enumerate(images)]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return [extract_features(source, im, load_size, layer, facet, bin, saliency, include_cls, n)
            for im, n in zip(images, names)]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32)."""
    return F.normalize(x.float(), dim=-1)


# ----------------------------------------------------------------------------------- token maps -> pixels
def _input_grid(grid: TokenGrid) -> TokenGrid:
    """The same grid with the resized input as its 'original' image (maps resized-image pixels)."""
    return dataclasses.replace(grid, image_hw=tuple(grid.input_hw))


def _axis_tokens(grid: TokenGrid, out_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Token row of every pixel row and token column of every pixel column of an image of ``out_hw`` pixels
    (the original image of ``grid``): nearest token centre to each pixel centre, by ``grid.pixels_to_tokens``."""
    H, W = out_hw
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    cols = grid.unflat(grid.pixels_to_tokens(torch.stack([xs, torch.full_like(xs, 0.5)], 1)))[1]
    rows = grid.unflat(grid.pixels_to_tokens(torch.stack([torch.full_like(ys, 0.5), ys], 1)))[0]
    return rows.numpy(), cols.numpy()


def tokens_to_image(values: np.ndarray, grid: TokenGrid, where: str = "image") -> np.ndarray:
    """Per-token values (``T`` or ``TxC``, row-major) -> a pixel map (``HxW`` or ``HxWxC``), each pixel taking
    its nearest token's value. ``where``: ``"image"`` (original pixels) or ``"input"`` (resized pixels)."""
    g = grid if where == "image" else _input_grid(grid)
    rows, cols = _axis_tokens(g, g.original_hw)
    h, w = grid.shape
    v = np.asarray(values)
    v = v.reshape((h, w) + v.shape[1:])
    return v[rows[:, None], cols[None, :]]


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
