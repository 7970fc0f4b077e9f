"""What the descriptor explorer computes for one clicked token: similarity maps, top-k matches, best buddies and
the attention of one query token. Tensors in and out, no drawing.

Shapes: ``T`` patch tokens of an image (row-major over its :class:`~densevit.models.grid.TokenGrid`), ``D`` descriptor
channels, ``N = 1 + T`` tokens with the CLS token first, ``heads`` attention heads.

Similarity maps are cosine similarities: rows are L2-normalised once (:func:`normalize`, cached by the caller), so
a click costs one matrix-vector product per image. Best buddies follow :func:`densevit.matching.knn.best_buddies`
(mutual nearest neighbours under cosine similarity, ties to the lowest index), restricted to the clicked token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import DensevitError
from ..models.grid import TokenGrid

__all__ = ["normalize", "similarity_map", "similarity_maps", "topk_tokens", "overlapping_tokens", "best_buddy", "best_buddies_of", "query_attention",
           "token_at", "grid_extent", "upsample_map", "Match"]


@dataclass(frozen=True)
class Match:
    """One marked token: flat token index, its centre ``(x, y)`` in original-image pixels, and its score."""

    token: int
    x: float
    y: float
    score: float



def _coord(v: float) -> str:
    """A pixel coordinate for a message: one decimal, or 3 significant digits when huge (never 300 digits)."""
    return f"{v:.1f}" if abs(v) < 1e7 else f"{v:.3g}"

def normalize(descriptors: torch.Tensor) -> torch.Tensor:
    """``TxD`` descriptors -> float32 rows of unit L2 norm (zero rows stay zero), contiguous."""
    return F.normalize(descriptors.float(), dim=-1).contiguous()


def similarity_map(query: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``T`` of a normalised ``D`` query to normalised ``TxD`` descriptors (one mat-vec)."""
    if query.shape[-1] != descriptors.shape[-1]:
        raise DensevitError(f"descriptor sizes differ: {query.shape[-1]} vs {descriptors.shape[-1]}")
    return descriptors @ query.to(descriptors.device, descriptors.dtype)


def similarity_maps(token: int, source: torch.Tensor, images: Sequence[torch.Tensor]) -> list:
    """Similarity maps of token ``token`` of the normalised ``source`` (``TxD``) over each normalised image."""
    q = source[int(token)]
    return [similarity_map(q, d) for d in images]


def topk_tokens(scores: torch.Tensor, k: int, exclude=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring tokens of a ``T`` map, best first. ``exclude``: a token index or a tensor of
    them left out (e.g. the clicked token and its overlapping neighbours in its own image). Returns
    ``(scores k', idx k')`` with ``k' = min(k, available)``."""
    s = scores.float()
    n = s.numel()
    if exclude is not None:
        drop = torch.unique(torch.as_tensor(exclude, dtype=torch.long).reshape(-1))
        s = s.clone()
        s[drop] = -float("inf")
        n -= drop.numel()
    v, i = s.topk(max(0, min(int(k), n)))
    return v, i


def overlapping_tokens(grid: TokenGrid, token: int) -> torch.Tensor:
    """Flat indices of the tokens whose patches overlap the patch of ``token`` (itself included): within
    ``ceil(patch / stride) - 1`` rows and columns."""
    h, w = grid.shape
    r = -(-grid.patch_size // grid.stride) - 1
    row, col = (int(t) for t in grid.unflat(torch.tensor([int(token)])))
    rows = torch.arange(max(0, row - r), min(h, row + r + 1))
    cols = torch.arange(max(0, col - r), min(w, col + r + 1))
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return grid.flat(rr.reshape(-1), cc.reshape(-1))


def best_buddy(token: int, source: torch.Tensor, target: torch.Tensor,
               scores: Optional[torch.Tensor] = None) -> Optional[int]:
    """The best buddy in ``target`` of token ``token`` of ``source`` (both normalised ``TxD``), or None.

    ``j`` is the buddy when ``j`` is the nearest neighbour of the token in ``target`` and the token is the nearest
    neighbour of ``target[j]`` in ``source`` (ties: lowest index, as :func:`densevit.matching.knn.best_buddies`).
    ``scores``: the token's similarity map over ``target``, when already computed. Two mat-vecs at most.
    """
    return best_buddies_of(token, source, [target], None if scores is None else [scores])[0]


def best_buddies_of(token: int, source: torch.Tensor, targets: Sequence[torch.Tensor],
                    scores: Optional[Sequence[torch.Tensor]] = None) -> List[Optional[int]]:
    """:func:`best_buddy` in each of several targets, reading ``source`` once: the targets' nearest neighbours
    of the token are checked against ``source`` in one matrix product (``T x n``)."""
    if not targets:
        return []
    if scores is None:
        scores = [similarity_map(source[int(token)], t) for t in targets]
    js = [int(torch.argmax(s)) for s in scores]
    back = source @ torch.stack([t[j] for t, j in zip(targets, js)]).to(source.device, source.dtype).T
    nn = back.argmax(dim=0).tolist()
    return [j if int(n) == int(token) else None for j, n in zip(js, nn)]


def query_attention(query: torch.Tensor, keys: torch.Tensor, num_heads: int,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention of one query token over all tokens: ``heads x N`` (rows sum to 1).

    ``query`` (``D``) and ``keys`` (``NxD``) are one block's query and key as its attention uses them, over all the
    tokens it attends over (:meth:`densevit.features.extractor.ViTExtractor.attention_inputs`), channel index ``c * heads + h``.
    ``scale`` defaults to ``head_dim ** -0.5``. Restricted to the patch tokens, it equals row ``i`` of the ``attn``
    facet.
    """
    D = query.shape[-1]
    if D % num_heads:
        raise DensevitError(f"descriptor size {D} is not a multiple of {num_heads} heads")
    d = D // num_heads
    scale = d ** -0.5 if scale is None else scale
    q = query.float().reshape(d, num_heads).T                        # heads x d
    k = keys.float().reshape(-1, d, num_heads).permute(2, 0, 1)      # heads x N x d
    logits = torch.einsum("hd,hnd->hn", q, k) * scale
    return logits.softmax(dim=-1)


def token_at(grid: TokenGrid, x: float, y: float) -> int:
    """Flat index of the token nearest to original-image pixel ``(x, y)``; a point outside the image is an
    error (one line)."""
    H, W = grid.original_hw
    if not (0 <= x < W and 0 <= y < H):
        raise DensevitError(f"point ({_coord(x)}, {_coord(y)}) is outside the image ({W}x{H} pixels)")
    return int(grid.pixels_to_tokens(torch.tensor([[float(x), float(y)]]))[0])


def grid_extent(grid: TokenGrid) -> Tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in original-image pixels of the area the token cells tile: token ``(i, j)`` owns the
    ``stride x stride`` cell centred on its centre. A ``h x w`` map drawn over this rectangle (pixel centres on
    token centres) lines up with the image."""
    h, w = grid.shape
    corners = grid.input_to_image(grid.grid_to_input(torch.tensor([[-0.5, -0.5], [w - 0.5, h - 0.5]])))
    return (float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1]))


def upsample_map(values: torch.Tensor, grid: TokenGrid, out_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A per-token map (``T``) -> ``HxW`` at the original image size (or ``out_hw`` spanning the same image),
    bilinear between token centres (clamped at the border): :meth:`TokenGrid.upsample`."""
    return grid.upsample(values.float().cpu(), out_hw)
