"""Dense keypoint transfer: move points from a source image to a target image through descriptor similarity.

Each source point takes the descriptor of its nearest token; its match is the target token most similar to it
(cosine), optionally refined by a soft-argmax over a window of tokens around that match. All pixel <-> token
conversions go through :class:`densevit.models.grid.TokenGrid`, so points are in each image's ORIGINAL pixels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import DensevitError, InvalidArgumentError
from ..models.grid import TokenGrid
from .knn import TensorLike, _as_2d, _chunk, knn

REFINE = ("none", "softargmax")


def _soft_argmax(sims: torch.Tensor, nn_idx: torch.Tensor, grid: TokenGrid, window: int,
                 temperature: float) -> torch.Tensor:
    """Continuous ``(col, row)`` grid positions ``Nx2``: the softmax(sims / temperature)-weighted mean of the
    token positions in a ``window x window`` neighbourhood of each nearest token (cells outside the grid
    are left out). ``sims`` is ``NxT`` (cosine similarities to every target token)."""
    h, w = grid.shape
    r = window // 2
    offs = torch.arange(-r, r + 1, device=sims.device)
    dr, dc = torch.meshgrid(offs, offs, indexing="ij")
    rows0, cols0 = grid.unflat(nn_idx.to(sims.device))
    rows = rows0[:, None] + dr.reshape(1, -1)                      # N x window^2
    cols = cols0[:, None] + dc.reshape(1, -1)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = grid.flat(rows.clamp(0, h - 1), cols.clamp(0, w - 1))
    logits = torch.gather(sims, 1, flat) / temperature
    weights = torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=1).double()
    return torch.stack([(weights * cols).sum(1), (weights * rows).sum(1)], dim=1)


def transfer_points(desc_src: torch.Tensor, desc_trg: torch.Tensor, grid_src: TokenGrid, grid_trg: TokenGrid,
                    points: torch.Tensor, refine: str = "none", window: int = 5, temperature: float = 0.02,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Transfer source points to the target image by descriptor nearest neighbour.

    Args:
        desc_src: ``TsxD`` source descriptors (row-major over ``grid_src``); desc_trg: ``TtxD`` likewise.
        points: ``Nx2`` ``(x, y)`` in source original-image pixels (out-of-image points use the nearest token).
        refine: ``"none"`` (target token centre) or ``"softargmax"`` (softmax-weighted mean position over a
            ``window x window`` token neighbourhood of the match, weights ``softmax(cos / temperature)``).
        backend: passed to :func:`densevit.matching.knn.knn` for the plain nearest neighbour.
    Returns:
        ``(points Nx2 float64 (x, y) in target original-image pixels, scores N float32 cosine similarity)``.
    """
    if refine not in REFINE:
        raise DensevitError(f"unknown refinement {refine!r}; choose from {', '.join(REFINE)}")
    if desc_src.dim() != 2 or desc_trg.dim() != 2 or desc_src.shape[1] != desc_trg.shape[1]:
        raise DensevitError(f"descriptors must be TxD with equal D, got {tuple(desc_src.shape)} and "
                            f"{tuple(desc_trg.shape)}")
    if desc_src.shape[0] != grid_src.num_tokens or desc_trg.shape[0] != grid_trg.num_tokens:
        raise DensevitError(f"descriptor counts {desc_src.shape[0]}, {desc_trg.shape[0]} do not match the token "
                            f"grids ({grid_src.num_tokens}, {grid_trg.num_tokens})")
    if refine == "softargmax" and (window < 1 or window % 2 == 0 or temperature <= 0):
        raise DensevitError(f"soft-argmax needs an odd window >= 1 and a positive temperature "
                            f"(got {window}, {temperature})")
    points = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    if points.shape[0] == 0:
        return points.clone(), torch.zeros(0)
    src_idx = grid_src.pixels_to_tokens(points.cpu()).to(desc_src.device)
    query = desc_src[src_idx]
    if refine == "none":
        sims, idx = knn(query, desc_trg, k=1, metric="cosine", backend=backend)
        scores, nn_idx = sims[:, 0], idx[:, 0]
        return grid_trg.tokens_to_pixels(nn_idx.cpu()), scores.float().cpu()
    sims = F.normalize(query.float(), dim=1) @ F.normalize(desc_trg.float(), dim=1).T   # N x Tt
    scores, nn_idx = sims.max(dim=1)
    colrow = _soft_argmax(sims, nn_idx, grid_trg, window, temperature).cpu()
    return grid_trg.input_to_image(grid_trg.grid_to_input(colrow)), scores.float().cpu()


@torch.no_grad()
def label_transfer(query: TensorLike, base: TensorLike, base_labels: TensorLike, k: int = 5,
                   temperature: float = 0.1, metric: str = "cosine", backend: str = "auto",
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Soft labels for query rows (NxD) from their k nearest base rows (MxD) with labels ``base_labels`` (MxC).

    With ``s_1..s_k`` the similarities of the top-k neighbours, the weights are
    ``w_i = exp(s_i / T) / sum_j exp(s_j / T)`` (a softmax over the top-k only), and the result is
    ``sum_i w_i * base_labels[nn_i]``: NxC float32 on the query's device (rows sum to 1 for one-hot /
    probability labels). ``k`` is clipped to M.
    """
    if temperature <= 0:
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
    labels = torch.as_tensor(base_labels)
    base_t = _as_2d(base, "base")
    if labels.ndim != 2 or labels.shape[0] != base_t.shape[0]:
        raise InvalidArgumentError(f"base_labels must be {base_t.shape[0]}xC, got shape {tuple(labels.shape)}")
    sims, idx = knn(query, base_t, min(k, base_t.shape[0]), metric, backend, chunk_size)
    labels = labels.to(idx.device, torch.float32)
    weights = torch.softmax(sims / temperature, dim=1)  # = exp(s/T) normalised over the top-k (stable)
    out = torch.empty((idx.shape[0], labels.shape[1]), dtype=torch.float32, device=idx.device)
    chunk = _chunk(chunk_size)
    for s in range(0, idx.shape[0], chunk):  # bounds the NxKxC gather
        out[s:s + chunk] = torch.einsum("nk,nkc->nc", weights[s:s + chunk], labels[idx[s:s + chunk]])
    return out
