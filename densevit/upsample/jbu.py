"""Training-free upsamplers: bilinear interpolation and classic joint bilateral upsampling (Kopf et al. 2007).

The guide ``image`` is the ``B x 3 x H x W`` RGB image in ``[0, 1]`` (not ImageNet-normalised): the range sigma
of :func:`jbu` is in those units.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .memory import FLOAT, working_budget
from .window import check_inputs, check_sigma, clamp_radius, output_size, rows_for, weighted_sum, windows

#: Bytes a chunk of :func:`jbu` holds per (output pixel, window cell): indices, weights and their temporaries.
PAIR_BYTES = 192


def bilinear(features: torch.Tensor, image: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
             max_bytes: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.interpolate(features, out_size, mode="bilinear", align_corners=False)``; the image gives only the
    default size. With ``max_bytes`` or ``out`` (``B x C x H x W``, may be a view) it runs over chunks of
    channels written into the output (the same values)."""
    check_inputs(features, image)
    size = output_size(out_size, image)
    if max_bytes is None and out is None:
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    B, C = features.shape[:2]
    plane = FLOAT * B * size[0] * size[1]
    budget = working_budget("bilinear", plane * C if out is None else 0, max_bytes)
    if out is None:
        out = features.new_empty(B, C, *size)
    step = max(1, min(C, budget // plane))
    for c0 in range(0, C, step):
        out[:, c0:c0 + step] = F.interpolate(features[:, c0:c0 + step], size=size, mode="bilinear",
                                             align_corners=False)
    return out


def jbu(features: torch.Tensor, image: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
        sigma_spatial: float = 1.0, sigma_range: float = 0.1, radius: Optional[int] = None,
        rows_per_chunk: Optional[int] = None, max_bytes: Optional[int] = None,
        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Joint bilateral upsampling: each output pixel ``p`` averages the low-res features ``f(q)`` of the cells
    ``q`` within ``radius`` (default ``ceil(2 * sigma_spatial)``, clamped to the grid) of its nearest cell, weighted by
    ``exp(-|p_low - q|^2 / (2 sigma_spatial^2)) * exp(-|I(p) - I_low(q)|^2 / (2 sigma_range^2))``.

    ``p_low`` is ``p``'s continuous position on the low-res grid (``align_corners=False`` convention), so
    ``sigma_spatial`` is in low-res cells; ``I`` is the guide resized to the output size, ``I_low`` the guide
    resized (bilinearly) to the low-res grid, both in ``[0, 1]``. Cells outside the grid do not count. Runs over
    chunks of ``rows_per_chunk`` output rows (default: as many as keep one gather within
    :data:`~densevit.upsample.window.GATHER_BUDGET` elements), so the working memory stays bounded (measured:
    about 0.5 GB beyond the 0.6 GB output for 768 channels from 56x56 to 448x448). ``max_bytes`` bounds what
    the call allocates (the output, the resized guide and the chunks: :mod:`densevit.upsample.memory`); ``out``
    (``B x C x H x W``, may be a view of a larger map) receives the result in place of a new tensor.
    """
    check_inputs(features, image)
    sigma_spatial = check_sigma("jbu sigma_spatial", sigma_spatial)
    sigma_range = check_sigma("jbu sigma_range", sigma_range)
    B, C, h, w = features.shape
    H, W = output_size(out_size, image)
    r = int(math.ceil(2 * sigma_spatial)) if radius is None else int(radius)
    if r < 0:
        raise InvalidArgumentError(f"jbu radius must be >= 0, got {radius}")
    r = clamp_radius(r, (h, w))                 # a wider window only adds cells outside the grid
    guide = image.float()
    if guide.shape[-2:] != (H, W):
        guide = F.interpolate(guide, size=(H, W), mode="bilinear", align_corners=False)
    guide_low = F.interpolate(image.float(), size=(h, w), mode="bilinear", align_corners=False)
    K = (2 * r + 1) ** 2
    fixed = FLOAT * B * 3 * (H * W if image.shape[-2:] != (H, W) else 0)
    budget = working_budget("jbu", FLOAT * B * C * H * W if out is None else 0, max_bytes, fixed)
    if rows_per_chunk is None and max_bytes is not None:
        rows_per_chunk = max(1, budget // 2 // max(1, W * (K * PAIR_BYTES + 3 * FLOAT * C)))
    gather = budget // 4 // (2 * FLOAT) if max_bytes is not None else None
    if out is None:
        out = features.new_empty(B, C, H, W)
    for b in range(B):
        g_hi = guide[b].reshape(3, -1)
        g_lo = guide_low[b].reshape(3, -1)
        for win in windows((h, w), (H, W), r, rows_per_chunk or rows_for(K, W, C), features.device):
            inside = (win.rows >= 0) & (win.rows < h) & (win.cols >= 0) & (win.cols < w)
            rr, cc = win.rows.clamp(0, h - 1), win.cols.clamp(0, w - 1)
            d2 = (win.u[None] - rr) ** 2 + (win.v[None] - cc) ** 2
            pix = g_hi[:, win.y0 * W:win.y1 * W]                      # 3 x P
            diff2 = ((pix[:, None, :] - g_lo[:, rr * w + cc]) ** 2).sum(0)  # K x P
            log_w = -d2 / (2 * sigma_spatial ** 2) - diff2 / (2 * sigma_range ** 2)
            log_w = log_w.masked_fill(~inside, float("-inf"))
            sums = weighted_sum(features[b], rr, cc, log_w) if gather is None else \
                weighted_sum(features[b], rr, cc, log_w, budget=gather)
            out[b, :, win.y0:win.y1] = sums.view(C, win.y1 - win.y0, W)
    return out
