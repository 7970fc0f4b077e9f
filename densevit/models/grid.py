"""The one mapping between image pixels and ViT token indices.

Coordinates are continuous, with (0, 0) at the top-left corner of the image, x to the right and y down.
Token ``(i, j)`` (row, column) of a patch grid with patch size ``p`` and stride ``s`` covers the input pixels
``[s*j, s*j + p) x [s*i, s*i + p)`` of the resized image, so its centre is ``(p/2 + s*j, p/2 + s*i)``.
The original image relates to the resized one by the per-axis scale ``image_hw / input_hw``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import DensevitError


def grid_shape(input_hw: Tuple[int, int], patch_size: int, stride: int) -> Tuple[int, int]:
    """Token grid ``(h, w) = (1 + (H - p) // s, 1 + (W - p) // s)`` for an input of ``(H, W)`` pixels."""
    H, W = int(input_hw[0]), int(input_hw[1])
    if H < patch_size or W < patch_size:
        raise DensevitError(f"image of {H}x{W} pixels is smaller than the {patch_size}-pixel patch")
    return 1 + (H - patch_size) // stride, 1 + (W - patch_size) // stride


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of one image: patch size, stride, resized input size and original image size."""

    patch_size: int
    stride: int
    input_hw: Tuple[int, int]
    image_hw: Tuple[int, int] | None = None

    @classmethod
    def pixels(cls, input_hw: Tuple[int, int], image_hw: Tuple[int, int] | None = None) -> "TokenGrid":
        """One token per pixel of an ``input_hw`` map (patch 1, stride 1: token ``(i, j)`` is pixel ``(i, j)``,
        centre ``(j + 0.5, i + 0.5)``), e.g. upsampled features; ``image_hw`` as for any grid."""
        return cls(1, 1, tuple(input_hw), tuple(image_hw) if image_hw is not None else None)

    @property
    def shape(self) -> Tuple[int, int]:
        """``(h, w)``: token rows and columns."""
        return grid_shape(self.input_hw, self.patch_size, self.stride)

    @property
    def num_tokens(self) -> int:
        h, w = self.shape
        return h * w

    @property
    def original_hw(self) -> Tuple[int, int]:
        return tuple(self.image_hw) if self.image_hw is not None else tuple(self.input_hw)

    @property
    def scale_xy(self) -> Tuple[float, float]:
        """Original pixels per resized pixel along x and y."""
        H0, W0 = self.original_hw
        return W0 / self.input_hw[1], H0 / self.input_hw[0]

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat row-major token index of ``(rows, cols)``."""
        return rows.long() * self.shape[1] + cols.long()

    def unflat(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of flat token indices."""
        idx = torch.as_tensor(idx).long()
        return idx // self.shape[1], idx % self.shape[1]

    def grid_to_input(self, colrow: torch.Tensor) -> torch.Tensor:
        """Continuous grid coordinates ``Nx2 (col, row)`` -> resized-image pixels ``Nx2 (x, y)``."""
        return colrow.double() * self.stride + self.patch_size / 2

    def input_to_grid(self, xy: torch.Tensor) -> torch.Tensor:
        """Resized-image pixels ``Nx2 (x, y)`` -> continuous grid coordinates ``Nx2 (col, row)``."""
        return (torch.as_tensor(xy).double() - self.patch_size / 2) / self.stride

    def input_to_image(self, xy: torch.Tensor) -> torch.Tensor:
        """Resized-image pixels -> original-image pixels (both ``Nx2 (x, y)``)."""
        sx, sy = self.scale_xy
        xy = torch.as_tensor(xy).double()
        return xy * xy.new_tensor([sx, sy])

    def image_to_input(self, xy: torch.Tensor) -> torch.Tensor:
        """Original-image pixels -> resized-image pixels (both ``Nx2 (x, y)``)."""
        sx, sy = self.scale_xy
        xy = torch.as_tensor(xy).double()
        return xy / xy.new_tensor([sx, sy])

    def token_centers_input(self) -> torch.Tensor:
        """``Tx2 (x, y)`` token centres in resized-image pixels, row-major."""
        rows, cols = self.unflat(torch.arange(self.num_tokens))
        return self.grid_to_input(torch.stack([cols, rows], dim=1))

    def token_centers(self) -> torch.Tensor:
        """``Tx2 (x, y)`` token centres in original-image pixels, row-major."""
        return self.input_to_image(self.token_centers_input())

    def tokens_to_pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat token indices ``N`` -> their centres ``Nx2 (x, y)`` in original-image pixels."""
        rows, cols = self.unflat(idx)
        return self.input_to_image(self.grid_to_input(torch.stack([cols, rows], dim=1)))

    def pixels_to_grid(self, xy: torch.Tensor) -> torch.Tensor:
        """Original-image pixels ``Nx2 (x, y)`` -> continuous grid coordinates ``Nx2 (col, row)``."""
        return self.input_to_grid(self.image_to_input(torch.as_tensor(xy)))

    def pixels_to_tokens(self, xy: torch.Tensor) -> torch.Tensor:
        """Original-image pixels ``Nx2 (x, y)`` -> flat index of the token with the nearest centre (clamped)."""
        h, w = self.shape
        g = torch.round(self.pixels_to_grid(xy))
        cols = g[:, 0].clamp(0, w - 1).long()
        rows = g[:, 1].clamp(0, h - 1).long()
        return self.flat(rows, cols)

    def _pixel_centres(self, out_hw: Optional[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x of every pixel column and y of every pixel row (float64, original-image pixels) of an image of
        ``out_hw`` pixels spanning the original image (default: the original image)."""
        H0, W0 = self.original_hw
        H, W = out_hw or (H0, W0)
        xs = (torch.arange(W, dtype=torch.float64) + 0.5) * (W0 / W)
        ys = (torch.arange(H, dtype=torch.float64) + 0.5) * (H0 / H)
        return xs, ys

    def pixel_tokens(self, out_hw: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows H, cols W)``: the token row of every pixel row and the token column of every pixel column of an
        image of ``out_hw`` pixels spanning the original (nearest token centre; the mapping is separable, so a
        full map is one gather ``map[rows[:, None], cols[None, :]]``)."""
        xs, ys = self._pixel_centres(out_hw)
        cols = self.unflat(self.pixels_to_tokens(torch.stack([xs, torch.full_like(xs, 0.5)], 1)))[1]
        rows = self.unflat(self.pixels_to_tokens(torch.stack([torch.full_like(ys, 0.5), ys], 1)))[0]
        return rows, cols

    def sampling_grid(self, out_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``1 x H x W x 2`` (x, y) coordinates for ``F.grid_sample(..., align_corners=True)`` that read an
        ``h x w`` token map at the centre of every pixel of an ``out_hw`` image spanning the original (default:
        the original size): bilinear between token centres, clamped at the border by ``padding_mode="border"``."""
        h, w = self.shape
        xs, ys = self._pixel_centres(out_hw)
        cols = self.pixels_to_grid(torch.stack([xs, torch.zeros_like(xs)], 1))[:, 0]
        rows = self.pixels_to_grid(torch.stack([torch.zeros_like(ys), ys], 1))[:, 1]
        gx = cols / max(w - 1, 1) * 2 - 1 if w > 1 else torch.zeros_like(cols)
        gy = rows / max(h - 1, 1) * 2 - 1 if h > 1 else torch.zeros_like(rows)
        return torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1).float().unsqueeze(0)

    def upsample(self, maps: torch.Tensor, out_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Token maps ``C x T`` (or ``T``) -> ``C x H x W`` (or ``H x W``) pixel maps, bilinear between token
        centres (:meth:`sampling_grid`)."""
        import torch.nn.functional as F

        h, w = self.shape
        m = maps.reshape(1, -1, h, w)
        up = F.grid_sample(m, self.sampling_grid(out_hw).to(m.device), mode="bilinear", padding_mode="border",
                           align_corners=True)[0]
        return up[0] if maps.dim() == 1 else up
