"""Log-binned descriptors (Amir et al. 2021): each token described by itself, its 3x3 neighbours and the eight
surrounding 3x3-average cells, 17 bins for hierarchy 2."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def num_bins(hierarchy: int = 2) -> int:
    """Bins per token: ``1 + 8 * hierarchy``."""
    return 1 + 8 * hierarchy


def log_bin(x: torch.Tensor, hierarchy: int = 2) -> torch.Tensor:
    """Log-bin a descriptor map.

    Args:
        x: ``BxCxhxw`` descriptors on the token grid.
    Returns:
        ``Bx(h*w)x(bins*C)``, channel index ``bin * C + c``. Bins, in order: for level ``k`` (cell size ``3**k``),
        the 3x3 cells at offsets ``{-3**k, 0, 3**k}`` (row-major), skipping the centre for ``k > 0``. Cells are
        average-pooled over ``3**k x 3**k`` tokens excluding padding; a cell outside the grid takes the value of
        the nearest cell inside it (replicate padding), as the reference implementation.
    """
    B, C, h, w = x.shape
    out = x.new_empty(B, h, w, num_bins(hierarchy), C)  # token-major, so the result is contiguous
    part = 0
    for k in range(hierarchy):
        size = 3 ** k
        pooled = x if size == 1 else F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
        padded = F.pad(pooled, (size, size, size, size), mode="replicate")
        for dy in (-size, 0, size):
            for dx in (-size, 0, size):
                if k > 0 and dy == 0 and dx == 0:
                    continue
                out[:, :, :, part] = padded[:, :, size + dy: size + dy + h, size + dx: size + dx + w].permute(0, 2, 3, 1)
                part += 1
    return out.view(B, h * w, -1)
