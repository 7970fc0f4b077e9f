"""Positional encodings on a token grid of any size and stride: the one place where they are resampled.

Two kinds, each declared per backbone by a :class:`PosEncoding` in the registry:

* **learned absolute** embeddings, resampled bicubically from their square training grid to the token grid.
  How matters, because each official code base does it its own way:

  - ``"scale"`` (DINO, DINOv2 without registers): the scale factor ``(n + offset) / side`` is passed to the
    interpolation instead of the output size (``offset = 0.1``, a historical kludge kept for compatibility), no
    antialiasing;
  - ``"size"`` (DINOv2 with registers: ``interpolate_offset=0``, ``interpolate_antialias=True``; timm's
    ``resample_abs_pos_embed`` for the supervised / MAE / CLIP ViTs): the output size is given, optionally
    antialiased.

* **rotary** (RoPE, DINOv3): no embedding is added; queries and keys of the patch tokens are rotated by angles
  ``2 pi c / period`` of their normalised coordinates ``c`` in ``[-1, 1]`` (axial: the first half of the head
  dimension for y, the second for x, each frequency used twice, "rotate half" layout).

**RoPE with a finer stride.** The official code gives patch ``(i, j)`` of an ``h x w`` patch grid the coordinates
``((i + 0.5) / h, (j + 0.5) / w)`` mapped to ``[-1, 1]`` (``normalize_coords="separate"``; ``"min"``/``"max"``
divide both by the smaller / larger side). densevit defines them from the token *centres in pixels*: a token of
patch size ``p`` and stride ``s`` at ``(i, j)`` has its centre at ``p/2 + s*i`` pixels, divided by the extent that
the official patch grid of the same input covers, ``p * (H // p)`` (and likewise for x). At ``s = p`` these are
exactly the official coordinates; at ``s = p/k`` every k-th token sits at an official coordinate, the others in
between (tokens in a last partial patch reach slightly past 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import DensevitError

Grid = Tuple[int, int]


@dataclass(frozen=True)
class PosEncoding:
    """How a backbone encodes positions.

    kind: ``"learned"`` (absolute embedding added to the tokens) or ``"rope"`` (rotary, in every attention).
    resample: learned only: ``"scale"`` (scale factor ``(n + offset) / side``) or ``"size"`` (output size).
    offset / antialias: learned only, as in the official code of the backbone.
    normalize: rope only: ``"separate"``, ``"min"`` or ``"max"`` (how patch coordinates are normalised).
    """

    kind: Literal["learned", "rope"] = "learned"
    resample: Literal["scale", "size"] = "scale"
    offset: float = 0.1
    antialias: bool = False
    normalize: Literal["separate", "min", "max"] = "separate"

    def describe(self) -> str:
        """A short human description (README table, ``--list-backbones``)."""
        if self.kind == "rope":
            return "RoPE (axial)"
        if self.resample == "scale":
            return f"learned, bicubic x(n+{self.offset:g})/side"
        return "learned, bicubic to size" + (", antialiased" if self.antialias else "")


DINO = PosEncoding("learned", "scale", 0.1, False)
DINOV2_REG = PosEncoding("learned", "size", 0.0, True)
TIMM = PosEncoding("learned", "size", 0.0, True)
ROPE = PosEncoding("rope")


def resample_pos_embed(patch_pos: torch.Tensor, grid_hw: Grid, enc: PosEncoding = DINO) -> torch.Tensor:
    """Resample a square ``1 x N x C`` patch position embedding to ``grid_hw`` tokens: ``1 x (h*w) x C``, float32.

    Returns ``patch_pos`` itself when the grid is its own square grid (as the official code does).
    """
    if enc.kind != "learned":
        raise DensevitError(f"{enc.kind} positions have no embedding to resample")
    N, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(math.sqrt(N))
    if side * side != N:
        raise DensevitError(f"position embedding of {N} tokens is not a square grid")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if (h, w) == (side, side):
        return patch_pos
    src = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if enc.resample == "scale":
        out = F.interpolate(src, scale_factor=((h + enc.offset) / side, (w + enc.offset) / side), mode="bicubic",
                            align_corners=False, recompute_scale_factor=False, antialias=enc.antialias)
    else:
        out = F.interpolate(src, size=(h, w), mode="bicubic", align_corners=False, antialias=enc.antialias)
    if out.shape[-2:] != (h, w):
        raise DensevitError(f"position embedding resampling gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim)


def rope_coords(input_hw: Grid, patch_size: int, stride: int, normalize: str = "separate",
                device: Optional[torch.device] = None) -> torch.Tensor:
    """``T x 2`` (y, x) RoPE coordinates in ``[-1, 1]`` of the token centres of an input of ``input_hw`` pixels,
    row-major (see the module docstring: the official coordinates at ``stride == patch_size``)."""
    from .grid import grid_shape

    h, w = grid_shape(input_hw, patch_size, stride)
    ext_h = patch_size * (int(input_hw[0]) // patch_size)           # pixels covered by the official patch grid
    ext_w = patch_size * (int(input_hw[1]) // patch_size)
    if normalize == "separate":
        div_h, div_w = ext_h, ext_w
    elif normalize == "max":
        div_h = div_w = max(ext_h, ext_w)
    elif normalize == "min":
        div_h = div_w = min(ext_h, ext_w)
    else:
        raise DensevitError(f"unknown RoPE coordinate normalisation {normalize!r}")
    dd = dict(device=device, dtype=torch.float32)
    ys = (patch_size / 2 + stride * torch.arange(h, **dd)) / div_h
    xs = (patch_size / 2 + stride * torch.arange(w, **dd)) / div_w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def rope_sincos(coords: torch.Tensor, periods: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)``, each ``T x head_dim`` float32, of ``T x 2`` coordinates and ``head_dim / 4`` periods."""
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]   # T x 2 x head_dim/4
    angles = angles.flatten(1, 2).tile(2)                                       # T x head_dim
    return torch.sin(angles), torch.cos(angles)


def rope_rotate(x: torch.Tensor, sincos: Tuple[torch.Tensor, torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Rotate ``B x heads x N x d`` queries or keys; the first ``num_prefix`` tokens (CLS, registers) are left
    as they are. Computed in float32, returned in ``x``'s dtype."""
    sin, cos = sincos
    t = x[:, :, num_prefix:].float()
    a, b = t.chunk(2, dim=-1)
    rotated = t * cos + torch.cat([-b, a], dim=-1) * sin
    return torch.cat([x[:, :, :num_prefix], rotated.to(x.dtype)], dim=2)
