"""Square letterboxing (GeoAware-SC's ``resize``): the long side to ``size`` pixels with LANCZOS, the short side
``round(size * short / long)``, pasted on a zero (black) ``size x size`` canvas centred along the short axis at
offset ``(size - short') // 2``; and the same mapping for points."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError

__all__ = ["Letterbox", "letterbox", "letterbox_geometry"]


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``image_wh`` lies on the ``size`` canvas: ``scale`` (canvas px per image px),
    ``resized_wh`` and the paste ``offset`` ``(x, y)``."""

    size: int
    image_wh: Tuple[int, int]
    resized_wh: Tuple[int, int]
    offset: Tuple[int, int]
    scale: float

    def to_canvas(self, points: torch.Tensor) -> torch.Tensor:
        """``Nx2 (x, y)`` image pixels -> canvas pixels, float32 as the reference computes them
        (``x * scale`` then ``+ offset``)."""
        p = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2).clone()
        p *= self.scale
        p[:, 0] += self.offset[0]
        p[:, 1] += self.offset[1]
        return p

    def to_image(self, points: torch.Tensor) -> torch.Tensor:
        """``Nx2`` canvas pixels -> image pixels (float64)."""
        p = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
        return (p - torch.tensor(self.offset, dtype=torch.float64)) / self.scale


def letterbox_geometry(image_wh: Tuple[int, int], size: int) -> Letterbox:
    """The placement of a ``(w, h)`` image on a ``size`` canvas (no pixels touched)."""
    w, h = int(image_wh[0]), int(image_wh[1])
    if size < 1 or w < 1 or h < 1:
        raise InvalidArgumentError(f"letterbox needs a positive size and image, got {size} and {w}x{h}")
    if h <= w:
        rw, rh = size, int(np.around(size * h / w))
    else:
        rw, rh = int(np.around(size * w / h)), size
    return Letterbox(size, (w, h), (rw, rh), ((size - rw) // 2, (size - rh) // 2), size / max(w, h))


def letterbox(image: Image.Image, size: int) -> Tuple[Image.Image, Letterbox]:
    """``(canvas RGB size x size, placement)`` of an RGB image."""
    geo = letterbox_geometry(image.size, size)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.convert("RGB").resize(geo.resized_wh, Image.Resampling.LANCZOS), geo.offset)
    return canvas, geo
