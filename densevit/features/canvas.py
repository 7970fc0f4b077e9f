"""Descriptors of a letterboxed square canvas (:mod:`densevit.io.letterbox`), as GeoAware-SC computes them: the
image (mirrored first when asked) resized and padded to ``size`` pixels, one ``(layer, facet)``, L2-normalised
per token; optionally a saliency mask from the same pass."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from PIL import Image

from ..io.images import to_tensor
from ..io.letterbox import letterbox

__all__ = ["canvas_descriptors", "normalize_descriptors", "read_mask", "read_object_mask"]


def read_mask(path) -> torch.Tensor:
    """A mask image -> float32 0/1 (grey value > 127), as GeoAware-SC reads its SAM masks."""
    import numpy as np

    with Image.open(path) as im:
        return torch.from_numpy((np.asarray(im.convert("L")) > 127).astype(np.float32))


def read_object_mask(base, flipped: bool = False, hint: str = "") -> torch.Tensor:
    """The object mask of an image in GeoAware-SC's layout: ``<base>_mask.png``, and for the mirrored image
    ``<base>_mask_flip.png`` or else the mask itself mirrored; a missing file is one line (``hint`` appended)."""
    from pathlib import Path

    from ..errors import DensevitError

    path = Path(f"{base}_mask_flip.png") if flipped else Path(f"{base}_mask.png")
    if path.is_file():
        return read_mask(path)
    if flipped and Path(f"{base}_mask.png").is_file():
        return read_mask(f"{base}_mask.png").flip(-1)
    raise DensevitError(f"missing object mask {path}" + (f" ({hint})" if hint else ""))


def normalize_descriptors(desc: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``desc / (||desc|| + eps)`` per row, float32 (the reference's ``normalize_feats``)."""
    desc = desc.float()
    return desc / (torch.linalg.norm(desc, dim=-1, keepdim=True) + eps)


def canvas_descriptors(extractor, image: Image.Image, size: int, layer: int, facet: str, bin: bool = False,
                       flipped: bool = False, saliency: bool = False
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(descriptors TxD float32 L2-normalised, mask n x n float 0/1 or None)``: ``mask`` is the last layer's
    CLS-attention saliency thresholded at its mean (only with ``saliency``)."""
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas, _ = letterbox(image, size)
    spec = extractor.spec
    x = to_tensor(canvas, spec.mean, spec.std)[None].to(extractor.device)
    feats = extractor.extract(x, (layer,), (facet,), bin=bin, saliency=saliency)
    desc = normalize_descriptors(feats.descriptors[(layer, facet)][0])
    mask = None
    if saliency:
        h, w = feats.grid.shape
        sal = feats.saliency[0].float().reshape(h, w)
        mask = (sal >= sal.mean()).float()
    return desc, mask
