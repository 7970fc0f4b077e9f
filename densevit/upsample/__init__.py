"""Feature upsamplers: ``B x C x h x w`` features + ``B x 3 x H x W`` guide image -> ``B x C x H x W``.

The guide is the RGB image in ``[0, 1]`` (not ImageNet-normalised; AnyUp normalises it itself, as its official
model expects). Methods (:data:`UPSAMPLERS`): ``bilinear``, ``jbu`` (joint bilateral upsampling, Kopf et al.
2007), ``upsample_anything`` (the test-time kernel fit of Upsample Anything, its official defaults) and ``anyup``
(the AnyUp architecture; official checkpoints by file name, or ``weights="random"``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..errors import InvalidArgumentError
from .anyup import CHECKPOINTS as ANYUP_CHECKPOINTS
from .anyup import AnyUp, anyup, load_anyup
from .jbu import bilinear, jbu
from .upsample_anything import upsample_anything

UPSAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "bilinear": bilinear,
    "jbu": jbu,
    "upsample_anything": upsample_anything,
    "anyup": anyup,
}

__all__ = ["UPSAMPLERS", "upsample", "bilinear", "jbu", "upsample_anything", "anyup", "AnyUp", "load_anyup",
           "ANYUP_CHECKPOINTS"]


def upsample(features: torch.Tensor, image: torch.Tensor, method: str, out_size: Optional[Tuple[int, int]] = None,
             **options) -> torch.Tensor:
    """Upsample ``features`` guided by ``image`` (``[0, 1]`` RGB) to ``out_size`` (default: the image's size)
    with ``method`` (a key of :data:`UPSAMPLERS`); ``options`` go to the method."""
    if method not in UPSAMPLERS:
        raise InvalidArgumentError(f"unknown upsampler {method!r}; choose from {', '.join(UPSAMPLERS)}")
    try:
        return UPSAMPLERS[method](features, image, out_size, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise InvalidArgumentError(f"upsampler {method!r}: {e}") from None
        raise
