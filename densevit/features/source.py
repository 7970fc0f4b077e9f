"""Where an application's features come from: one interface for the model and for a feature store.

:class:`FeatureSource` is structural (a :class:`typing.Protocol`): :class:`~densevit.features.extractor.ViTExtractor`
runs one forward pass per image, :class:`~densevit.storage.store.FeatureStore` reads what ``densevit-extract
--store`` wrote (its backbone, weights, stride and load size apply). Apps call :meth:`FeatureSource.image_features`
and never ask which one they hold; :attr:`FeatureSource.runs_model` says whether extra passes of the model (the
reference's low-resolution saliency) are possible. Apps with their own preprocessing (video propagation, object
discovery) call :meth:`FeatureSource.frames_features` with an :class:`~densevit.features.frames.InputRule`: batches
of frames, several layers / facets in one pass; a store serves the rule it was extracted with and refuses others in
one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
from PIL import Image

from ..models.grid import TokenGrid

__all__ = ["FeatureSource", "ImageFeatures", "ImageInput", "image_name"]

ImageInput = Union[str, Path, Image.Image]


@dataclass
class ImageFeatures:
    """One image's features, on its token grid.

    Attributes:
        name: the image's name (file stem, or ``image<i>``).
        image: the original image (RGB, EXIF orientation applied; None from a store asked for no ``pixels``).
        resized: the network input before normalisation (RGB; likewise).
        grid: the token grid (pixel <-> token maps).
        descriptors: ``T x D`` float32 (``T x 17D`` log-binned), row-major token order, on the CPU.
        saliency: ``T`` float32 CLS-attention saliency in [0, 1], or None.
        cls: ``D`` float32 CLS descriptor, or None.
    """

    name: str
    image: Optional[Image.Image]
    resized: Optional[Image.Image]
    grid: TokenGrid
    descriptors: torch.Tensor
    saliency: Optional[torch.Tensor] = None
    cls: Optional[torch.Tensor] = None

    @property
    def image_hw(self) -> Tuple[int, int]:
        """The original image's ``(H, W)``."""
        return self.grid.original_hw


def image_name(image: ImageInput, index: int) -> str:
    """A readable name for an input: the file stem, or ``image<index>``."""
    return Path(image).stem if isinstance(image, (str, Path)) else f"image{index}"


@runtime_checkable
class FeatureSource(Protocol):
    """What every app reads features through (the model or a store)."""

    runs_model: bool
    """True for a model (more passes possible), False for a store (only what was extracted)."""

    def resolve_layer(self, layer: int) -> int:
        """Block index of ``layer`` (negative counts from the end)."""
        ...

    def image_features(self, image: ImageInput, load_size: Optional[int], layer: int, facet: str, *,
                       bin: bool = False, saliency: bool = True, include_cls: bool = False,
                       name: Optional[str] = None, pixels: bool = True) -> ImageFeatures:
        """One image's descriptors (and saliency / CLS descriptor) of block ``layer``, ``facet``; a store's own
        load size applies (``load_size`` is then ignored). ``pixels=False``: only descriptors and grid are needed
        (a store then reads no image file: ``image`` and ``resized`` are None, and ``image`` may be a store key)."""
        ...

    def frames_features(self, frames: Sequence[ImageInput], rule: "InputRule", layers: Sequence[int],  # noqa: F821
                        facets: Sequence[str], *, batch_size: int = 8, guide: bool = False,
                        saliency: bool = False, attention: bool = False, stride: Optional[int] = None,
                        names: Optional[Sequence[str]] = None,
                        check_grid: Optional[Callable[[TokenGrid], None]] = None) -> Iterator["FrameBatch"]:
        """Images brought to the model input by ``rule``, in batches of up to ``batch_size`` (in order, one input
        size), each with every ``(layer, facet)`` asked for (``facets`` may be empty), with ``guide`` the network
        input as RGB in ``[0, 1]``, with ``saliency`` the CLS-attention saliency, with ``attention`` each layer's
        attention inputs, at patch ``stride`` (None: the source's); ``check_grid`` is
        called with each batch's token grid before it is computed. A store refuses, in one line, a rule, stride or
        output it does not hold."""
        ...
