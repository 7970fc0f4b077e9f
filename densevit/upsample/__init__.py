"""Feature upsamplers: ``B x C x h x w`` features + ``B x 3 x H x W`` guide image -> ``B x C x H x W``.

The guide is the RGB image in ``[0, 1]`` (not ImageNet-normalised; AnyUp normalises it itself, as its official
model expects). Methods (:data:`UPSAMPLERS`): ``bilinear``, ``jbu`` (joint bilateral upsampling, Kopf et al.
2007), ``upsample_anything`` (the test-time kernel fit of Upsample Anything, its official defaults) and ``anyup``
(the AnyUp architecture; official checkpoints by file name, or ``weights="random"``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F

import torch

from ..errors import InvalidArgumentError
from ..models.grid import TokenGrid
from .anyup import CHECKPOINTS as ANYUP_CHECKPOINTS
from .anyup import AnyUp, anyup, load_anyup
from .jbu import bilinear, jbu
from .memory import FLOAT, parse_bytes, working_budget
from .upsample_anything import upsample_anything
from .window import output_size

UPSAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "bilinear": bilinear,
    "jbu": jbu,
    "upsample_anything": upsample_anything,
    "anyup": anyup,
}

__all__ = ["UPSAMPLERS", "CHANNELWISE", "check_method", "upsample", "upsample_tokens", "upsample_token_maps", "bilinear",
           "jbu", "upsample_anything", "anyup", "AnyUp", "load_anyup", "ANYUP_CHECKPOINTS"]


CHANNELWISE = frozenset({"bilinear", "jbu", "upsample_anything"})
"""Methods whose output channels each depend on their own input channel only (and on the guide): several maps
of one image upsample as one (Upsample Anything fits its kernels once). AnyUp attends over all channels."""


def check_method(method: Optional[str], allow_none: bool = False) -> None:
    """``method`` is a key of :data:`UPSAMPLERS` (or None, no upsampling, with ``allow_none``); else a one-line
    :class:`~densevit.errors.InvalidArgumentError` (every config and app checks the name here)."""
    if not (allow_none and method is None) and method not in UPSAMPLERS:
        raise InvalidArgumentError(f"unknown upsampler {method!r}; choose from {', '.join(UPSAMPLERS)}")


def upsample(features: torch.Tensor, image: torch.Tensor, method: str, out_size: Optional[Tuple[int, int]] = None,
             **options) -> torch.Tensor:
    """Upsample ``features`` guided by ``image`` (``[0, 1]`` RGB) to ``out_size`` (default: the image's size)
    with ``method`` (a key of :data:`UPSAMPLERS`); ``options`` go to the method. Every method takes
    ``max_bytes`` (a bound on what the call allocates, :mod:`densevit.upsample.memory`; ``"4G"`` strings are
    accepted here) and ``out`` (a ``B x C x H x W`` tensor, possibly a view, that receives the result)."""
    if isinstance(options.get("max_bytes"), str):
        options["max_bytes"] = parse_bytes(options["max_bytes"])
    check_method(method)
    if out_size is not None:
        output_size(out_size, image)
    try:
        return UPSAMPLERS[method](features, image, out_size, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise InvalidArgumentError(f"upsampler {method!r}: {e}") from None
        raise


def upsample_tokens(tokens: torch.Tensor, grid: TokenGrid, guide: torch.Tensor, method: str,
                    out_size: Optional[Tuple[int, int]] = None, **options) -> Tuple[torch.Tensor, TokenGrid]:
    """Token maps ``B x T x D`` on ``grid`` -> ``(B x T' x D, TokenGrid.pixels(out))``: upsampled with ``method``,
    guided by ``guide`` (``B x 3 x H x W`` RGB in ``[0, 1]``, the grid's network input), onto the pixels of the
    input (or of ``out_size`` spanning it).

    The tokens' cells (stride ``s``, centred on the token centres) tile the input region from ``(p - s) / 2``
    to ``(p - s) / 2 + s * h`` (rows; the same for columns): the features are upsampled onto that region, guided
    by the same region of the image, and the border outside it takes the nearest value."""
    H, W = grid.input_hw
    Ho, Wo = (int(out_size[0]), int(out_size[1])) if out_size is not None else (H, W)
    h, w = grid.shape
    off = (grid.patch_size - grid.stride) / 2
    top, left = round(off * Ho / H), round(off * Wo / W)
    bottom = min(Ho, round((off + grid.stride * h) * Ho / H))
    right = min(Wo, round((off + grid.stride * w) * Wo / W))
    guide = guide.float().clamp(0, 1)
    if (Ho, Wo) != tuple(guide.shape[-2:]):
        guide = F.interpolate(guide, size=(Ho, Wo), mode="bilinear", align_corners=False).clamp(0, 1)
    guide = guide[..., top:bottom, left:right]
    B, _, D = tokens.shape
    maps = tokens.transpose(1, 2).reshape(B, D, h, w)
    max_bytes = parse_bytes(options.pop("max_bytes", None))
    if max_bytes is not None:   # the whole output is allocated here; the method gets what is left
        whole = tokens.element_size() * B * D * Ho * Wo
        working_budget(method, whole, max_bytes, FLOAT * B * 3 * Ho * Wo)
        options["max_bytes"] = int(max_bytes) - whole
    # The output is allocated once (channels-last, so the B x T x D result is a view) and the method writes the
    # covered region into it; the border then repeats the nearest covered value in place (no padded copy).
    full = torch.empty(B, D, Ho, Wo, dtype=tokens.dtype, device=tokens.device, memory_format=torch.channels_last)
    upsample(maps, guide, method, out_size=(bottom - top, right - left), out=full[..., top:bottom, left:right],
             **options)
    if top:
        full[..., :top, left:right] = full[..., top:top + 1, left:right]
    if bottom < Ho:
        full[..., bottom:, left:right] = full[..., bottom - 1:bottom, left:right]
    if left:
        full[..., :left] = full[..., left:left + 1]
    if right < Wo:
        full[..., right:] = full[..., right - 1:right]
    return full.reshape(B, D, Ho * Wo).transpose(1, 2), TokenGrid.pixels((Ho, Wo), grid.original_hw)


def upsample_token_maps(maps: Sequence[torch.Tensor], grid: TokenGrid, guide: torch.Tensor, method: str,
                        out_size: Optional[Tuple[int, int]] = None, **options
                        ) -> Tuple[List[torch.Tensor], TokenGrid]:
    """:func:`upsample_tokens` of several ``B x T x D_i`` maps of the same images: one call of a
    :data:`CHANNELWISE` method for all of them (channels concatenated), one call per map otherwise."""
    if method in CHANNELWISE and len(maps) > 1:
        up, out_grid = upsample_tokens(torch.cat([m.float() for m in maps], dim=-1), grid, guide, method, out_size,
                                       **options)
        return list(up.split([m.shape[-1] for m in maps], dim=-1)), out_grid
    outs = [upsample_tokens(m, grid, guide, method, out_size, **options) for m in maps]
    return [o for o, _ in outs], outs[0][1]
