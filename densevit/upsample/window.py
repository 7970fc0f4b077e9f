"""Neighbourhood sums shared by the joint-bilateral upsamplers: each output pixel averages the low-res feature
vectors of a square window of low-res cells, with weights given by the method (``softmax`` of log-weights).

Coordinates follow ``F.interpolate(..., align_corners=False)``: output pixel ``(Y, X)`` of an ``H x W`` output
sits at low-res coordinates ``u = (Y + 0.5) * h / H - 0.5`` (rows) and ``v = (X + 0.5) * w / W - 0.5``
(columns); its window is centred on the nearest low-res cell ``(round(u), round(v))`` (clamped to the grid).
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch

from ..errors import InvalidArgumentError

#: Elements of one gathered ``K x P x C`` block (about 256 MB in float32): what bounds the memory.
GATHER_BUDGET = 64 * 2 ** 20


@dataclass
class Window:
    """The window of one chunk of output rows ``[y0, y1)``: ``K`` offsets for ``P = (y1 - y0) * W`` pixels."""

    y0: int
    y1: int
    u: torch.Tensor    # P continuous low-res row of each output pixel
    v: torch.Tensor    # P continuous low-res column
    dy: torch.Tensor   # K x 1 row offsets
    dx: torch.Tensor   # K x 1 column offsets
    rows: torch.Tensor  # K x P low-res row of each neighbour (unclamped)
    cols: torch.Tensor  # K x P low-res column (unclamped)


def offsets(radius: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets of the ``(2r+1)^2`` square window, row-major: ``K x 1`` each."""
    r = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return dy.reshape(-1, 1), dx.reshape(-1, 1)


def windows(low_hw: Tuple[int, int], out_hw: Tuple[int, int], radius: int, rows_per_chunk: int,
            device: torch.device, scale: Tuple[float, float] | None = None) -> Iterator[Window]:
    """The windows of consecutive chunks of ``rows_per_chunk`` output rows. ``scale`` (output pixels per low-res
    cell, rows and columns) defaults to ``out / low``."""
    (h, w), (H, W) = low_hw, out_hw
    sy, sx = scale if scale is not None else (H / h, W / w)
    dy, dx = offsets(radius, device)
    X = torch.arange(W, device=device, dtype=torch.float32)
    v_row = (X + 0.5) / sx - 0.5
    vc_row = torch.round(v_row).clamp(0, w - 1).long()
    for y0 in range(0, H, rows_per_chunk):
        y1 = min(H, y0 + rows_per_chunk)
        Y = torch.arange(y0, y1, device=device, dtype=torch.float32)
        u = ((Y + 0.5) / sy - 0.5)[:, None].expand(-1, W).reshape(-1)
        v = v_row[None, :].expand(y1 - y0, -1).reshape(-1)
        uc = torch.round(u).clamp(0, h - 1).long()
        vc = vc_row[None, :].expand(y1 - y0, -1).reshape(-1)
        yield Window(y0, y1, u, v, dy, dx, uc[None] + dy, vc[None] + dx)


def rows_for(K: int, W: int, C: int, budget: int = GATHER_BUDGET) -> int:
    """Output rows per chunk so that a ``K x rows*W x C`` gather stays within ``budget`` elements (at least 1)."""
    return max(1, budget // max(1, K * W * C))


def weighted_sum(features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, log_w: torch.Tensor,
                 budget: int = GATHER_BUDGET) -> torch.Tensor:
    """``sum_k softmax_k(log_w)[k, p] * features[:, rows[k, p], cols[k, p]]`` for one image.

    ``features`` is ``C x h x w``; ``rows``/``cols`` are ``K x P`` in-grid indices; ``log_w`` is ``K x P``
    (``-inf`` excludes a neighbour; every pixel must keep one). Returns ``C x P``. The gather runs over chunks of
    neighbours so that at most ``budget`` elements are gathered at once.
    """
    C, h, w = features.shape
    K, P = log_w.shape
    weights = torch.softmax(log_w, dim=0)
    flat = features.reshape(C, h * w).t()
    idx = rows * w + cols
    out = features.new_zeros(P, C)
    step = max(1, budget // max(1, P * C))
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        picked = flat.index_select(0, idx[k0:k1].reshape(-1)).view(k1 - k0, P, C)
        out = out + (picked * weights[k0:k1, :, None].to(picked.dtype)).sum(0)
    return out.t()


def check_inputs(features: torch.Tensor, image: torch.Tensor) -> None:
    """``B x C x h x w`` features and a ``B x 3 x H x W`` guide of the same batch size."""
    if features.dim() != 4 or image.dim() != 4 or image.shape[1] != 3 or image.shape[0] != features.shape[0]:
        raise InvalidArgumentError(f"upsampling needs B x C x h x w features and a B x 3 x H x W image, got "
                                   f"{tuple(features.shape)} and {tuple(image.shape)}")




def output_size(out_size: Optional[Sequence[int]], image: torch.Tensor) -> Tuple[int, int]:
    """``(H, W)`` of an upsampler's output: ``out_size`` (two positive whole numbers) or the guide image's size."""
    if out_size is None:
        return int(image.shape[-2]), int(image.shape[-1])
    try:
        H, W = (int(s) for s in out_size)
        ok = all(float(s) == int(s) for s in out_size)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or H < 1 or W < 1:
        raise InvalidArgumentError(f"upsampling out_size must be two positive whole numbers (H, W), got {out_size!r}")
    return H, W


def check_sigma(name: str, value: float) -> float:
    """A sigma of an upsampler: a finite number above zero (NaN and infinity refused)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise InvalidArgumentError(f"{name} must be a finite number above 0, got {value!r}")
    return v


def clamp_radius(radius: int, low_hw: Tuple[int, int]) -> int:
    """A window radius clamped to the low-res grid: beyond ``max(h, w) - 1`` cells every neighbour lies outside
    the grid (the window is centred on a cell of the grid), so a larger radius gives the same result, slower."""
    return max(0, min(int(radius), max(low_hw) - 1))
