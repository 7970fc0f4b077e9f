"""How images become model input for :meth:`FeatureSource.frames_features`: one named rule per app, one reader.

:class:`InputRule` names the preprocessing an app's reference uses, so that a source can run it (the model) or say
whether it holds its result (a store holds ``short_side`` at its load size only):

- ``short_side``: the shorter side resized to ``size`` with PIL's Lanczos filter (``None``: the original size),
  the longer side floored; the extractor's and the store's rule (:func:`densevit.io.images.preprocess`);
- ``exact``: resized to ``size = (H, W)`` exactly, bilinearly with OpenCV on uint8 (DINO's ``read_frame``);
- ``crw``: read with OpenCV (a file) as float32 ``/ 255`` and resized to ``size = (H, W)`` exactly, bilinearly
  with OpenCV on the floats (CRW's ``test.py``, :func:`crw_frame`);
- ``round``: resized with Lanczos to each side of the ``short_side`` size rounded to the nearest multiple of the
  patch (at least one patch).

``pad`` zero-pads the normalised input at the bottom and right to a multiple of the patch (the object discovery
references). :func:`load_input` applies a rule to one image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DensevitError
from ..io.images import LoadSize, as_pil, resize_short_side, resized_hw, to_tensor
from ..models.grid import TokenGrid
from .source import ImageInput

__all__ = ["RESIZES", "InputRule", "FrameBatch", "load_input", "frame_size", "crw_frame"]

RESIZES = ("short_side", "exact", "round", "crw")


@dataclass(frozen=True)
class InputRule:
    """How an image becomes model input (module doc): ``resize`` rule, its ``size``, zero ``pad`` to the patch."""

    resize: str = "short_side"
    size: LoadSize = None
    pad: bool = False

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise DensevitError(f"unknown input resize rule {self.resize!r}; choose from {', '.join(RESIZES)}")
        if self.resize in ("exact", "crw") and not isinstance(self.size, (tuple, list)):
            raise DensevitError(f"the {self.resize} resize rule needs a size (H, W)")

    def describe(self) -> str:
        """The rule in words, for one-line refusals."""
        if self.resize == "short_side":
            what = f"shorter side to {self.size} (Lanczos)" if self.size else "the original size"
        elif self.resize == "round":
            what = f"sides rounded to the patch at load size {self.size}"
        else:
            kind = "OpenCV bilinear" if self.resize == "exact" else "CRW's float OpenCV bilinear"
            what = f"exactly {self.size[1]}x{self.size[0]} ({kind})"
        return what + (", zero-padded to the patch" if self.pad else "")


@dataclass
class FrameBatch:
    """Features of a batch of images of one network-input size, from :meth:`FeatureSource.frames_features`.

    Attributes:
        names: the images' names.
        images_hw: the original ``(H, W)`` of each image.
        resized: each network input before normalisation and padding (RGB; None with the ``crw`` rule).
        grid: the token grid of the network input (padded size with ``pad``); its ``image_hw`` is the first
            image's original size (the padded size with ``pad``).
        descriptors: ``(layer, facet) -> B x T x D`` (layers as the caller gave them), on the source's device.
        guide: ``B x 3 x H x W`` network input as RGB in ``[0, 1]`` (the upsamplers' guide), when asked for.
        saliency: ``B x T`` CLS-attention saliency in ``[0, 1]``, when asked for.
        attention: ``layer -> (query, key, scale)``, when asked for: ``B x N x D`` over all tokens, prefix tokens
            first, exactly as the attention uses them (:meth:`ViTExtractor.attention_inputs`).
    """

    names: List[str]
    images_hw: List[Tuple[int, int]]
    resized: List[Image.Image]
    grid: TokenGrid
    descriptors: Dict[Tuple[int, str], torch.Tensor]
    guide: Optional[torch.Tensor] = None
    saliency: Optional[torch.Tensor] = None
    attention: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor, float]]] = None


def frame_size(image: ImageInput) -> Tuple[int, int]:
    """The ``(H, W)`` of an image (a file is read only up to its header)."""
    from ..io.images import image_size

    if isinstance(image, (str, Path)):
        return image_size(image)
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(np.asarray(image).shape[:2])


def load_input(image: ImageInput, rule: InputRule, mean, std, patch_size: int
               ) -> Tuple[torch.Tensor, Image.Image, Tuple[int, int]]:
    """One image through ``rule``: ``(x 3xHxW normalised (padded with rule.pad), resized RGB, original (H0, W0))``."""
    if rule.resize == "crw":
        x, hw = crw_frame(image, rule.size, mean, std)
        return x, None, hw
    img = as_pil(image)
    hw = (img.height, img.width)
    if rule.resize == "exact":
        resized = Image.fromarray(cv2.resize(np.asarray(img), (int(rule.size[1]), int(rule.size[0])),
                                             interpolation=cv2.INTER_LINEAR))
    elif rule.resize == "round":
        p = patch_size
        Hr, Wr = resized_hw(hw, rule.size)
        Ht, Wt = max(p, int(round(Hr / p)) * p), max(p, int(round(Wr / p)) * p)
        resized = img if (Ht, Wt) == hw else img.resize((Wt, Ht), Image.LANCZOS)
    else:
        resized = resize_short_side(img, rule.size)
    x = to_tensor(resized, mean, std)
    if rule.pad:
        Hr, Wr = x.shape[-2:]
        x = F.pad(x, (0, math.ceil(Wr / patch_size) * patch_size - Wr, 0, math.ceil(Hr / patch_size) * patch_size - Hr))
    return x, resized, hw


def _bgr(frame: ImageInput) -> np.ndarray:
    """``HxWx3`` uint8 BGR of a file (``cv2.imread``) or of an RGB array."""
    if isinstance(frame, (str, Path)):
        img = cv2.imread(str(frame))
        if img is None:
            raise DensevitError(f"cannot read the frame {frame}")
        return img
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3][..., ::-1])


def crw_frame(frame: ImageInput, crop: Union[int, Tuple[int, int]], mean: Sequence[float] = (0.485, 0.456, 0.406),
              std: Sequence[float] = (0.229, 0.224, 0.225)) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """A frame as CRW reads it: float32 ``/ 255``, RGB, bilinear ``cv2.resize`` to ``crop x crop`` (or ``(H, W)``),
    normalised.

    Returns ``(x 3 x H x W, original (H0, W0))``."""
    H, W = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    img = _bgr(frame).astype(np.float32) / 255.0
    hw = img.shape[:2]
    img = cv2.resize(np.ascontiguousarray(img[:, :, ::-1]), (W, H))
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s, (int(hw[0]), int(hw[1]))
