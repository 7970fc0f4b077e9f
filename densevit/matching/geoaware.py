"""GeoAware-SC's training-free matching steps (Zhang et al., *Telling Left from Right*, CVPR 2024), on a square
``n x n`` token grid of letterboxed images (:mod:`densevit.io.letterbox`), keypoints in canvas pixels of an
``anno``-pixel canvas (the reference's ``ANNO_SIZE``).

* :func:`points_to_tokens`: canvas pixels -> token index ``n * int(n / anno * y) + int(n / anno * x)``.
* :func:`transfer_canvas_points`: nearest neighbour, or *window soft-argmax* (``window`` = the reference's
  ``SOFT_EVAL_WINDOW`` ``N``: the similarity row multiplied by a ``(2N+1)``-square mask around its arg-max
  (clamped at the border), softmaxed over all targets at ``beta``, expectation over ``linspace(-1, 1, n)``;
  ``N = 0``: plain soft-argmax).
* :func:`flip_permutation`, :func:`flip_points`: the keypoint ids of the mirrored image.
* :func:`mask_distance` (vectorised, same result as the reference's per-cell loop) and
  :func:`mutual_nn_distance`: how well two descriptor maps agree.
* :func:`choose_orientation`: keep the flipped source's predictions where the flip agrees better.

Descriptors are ``TxD`` (``T = n * n``, row-major) and compared by their dot product after L2 normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..options import opt

Group = Union[int, Sequence[int]]

__all__ = ["points_to_tokens", "window_soft_argmax", "transfer_canvas_points",
           "flip_permutation", "flip_points", "compact_table", "mask_distance", "mutual_nn_distance",
           "choose_orientation", "align_and_transfer", "GeoAwareOptions", "POSE_ALIGN", "REFINE"]

POSE_ALIGN = ("none", "flip-mask", "flip-mutual-nn")
REFINE = ("none", "window-softargmax")


def _groups(table: Sequence[Group]) -> List[List[int]]:
    return [[int(g)] if isinstance(g, int) else [int(i) for i in g] for g in table]


def _grid_side(num_tokens: int) -> int:
    n = int(round(num_tokens ** 0.5))
    if n * n != num_tokens:
        raise InvalidArgumentError(f"GeoAware matching needs a square token grid, got {num_tokens} tokens")
    return n


def points_to_tokens(points: torch.Tensor, anno: int, n: int) -> torch.Tensor:
    """Token indices (long) of ``Nx2`` canvas points: ``n * int(n / anno * y) + int(n / anno * x)`` in float32, as
    the reference computes them (a point on the right edge, e.g. a mirrored ``x = 0``, is column ``n``: the next
    row's first token); indices past the grid are clamped to its last token."""
    p = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    f = torch.tensor(n / anno, dtype=torch.float32)
    col = (f * p[:, 0]).to(torch.int32).long()
    row = (f * p[:, 1]).to(torch.int32).long()
    return (n * row + col).clamp(0, n * n - 1)


def window_soft_argmax(sims: torch.Tensor, n: int, window: int, beta: float = 0.02) -> torch.Tensor:
    """Continuous ``(col, row)`` (``Nx2`` float32, in ``[0, n - 1]``) of the soft-argmax of each similarity row
    ``NxT`` over the ``n x n`` target grid, restricted to a ``(2 * window + 1)``-square around the row's arg-max
    (``window = 0``: all targets). Outside the window the similarity is multiplied by zero (not removed), as the
    reference does."""
    if window < 0:
        raise InvalidArgumentError(f"the soft-argmax window must be >= 0, got {window}")
    sims = sims.float()
    if window > 0:
        arg = sims.argmax(dim=1)
        r0, c0 = arg // n, arg % n
        offs = torch.arange(-window, window + 1, device=sims.device)
        rows = (r0[:, None, None] + offs[None, :, None]).clamp(0, n - 1)
        cols = (c0[:, None, None] + offs[None, None, :]).clamp(0, n - 1)
        mask = torch.zeros_like(sims)
        mask.scatter_(1, (rows * n + cols).reshape(len(sims), -1), 1.0)
        sims = sims * mask
    m = sims.max(dim=1, keepdim=True).values
    e = torch.exp((sims - m) / beta)
    prob = (e / e.sum(dim=1, keepdim=True)).view(-1, n, n)
    lin = torch.linspace(-1, 1, n, dtype=torch.float64, device=sims.device).float()
    gx = (prob.sum(dim=1) * lin).sum(dim=1)
    gy = (prob.sum(dim=2) * lin).sum(dim=1)
    xy = torch.stack([gx, gy], dim=1)
    return ((xy + 1) * (n - 1) / 2.0).clamp(0, n - 1)


def transfer_canvas_points(desc_src: torch.Tensor, desc_trg: torch.Tensor, points: torch.Tensor, anno: int,
                           refine: str = "window-softargmax", window: int = 5, beta: float = 0.02) -> torch.Tensor:
    """Source canvas points ``Nx2`` -> target canvas points ``Nx2`` float32 (token centres
    ``i * anno / n + (anno / n) // 2``, continuous under ``window-softargmax``); descriptors L2-normalised
    ``TxD`` on one ``n x n`` grid."""
    if refine not in REFINE:
        raise InvalidArgumentError(f"unknown refinement {refine!r}; choose from {', '.join(REFINE)}")
    n = _grid_side(desc_src.shape[0])
    idx = points_to_tokens(points, anno, n).to(desc_src.device)
    sims = desc_src[idx].float() @ desc_trg.float().T
    if refine == "none":
        arg = sims.argmax(dim=1)
        xy = torch.stack([arg % n, arg // n], dim=1).float()
    else:
        xy = window_soft_argmax(sims, n, window, beta)
    stride = anno / n
    return (xy * stride + stride // 2).cpu()


def flip_permutation(table: Sequence[Group], n: int, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``perm`` (long ``n``): after a horizontal flip, keypoint ``i`` is the mirrored keypoint ``perm[i]``.
    Each group ``[a, b, ...]`` of ``table`` maps ``a -> b -> ... -> a``; with ``visible`` (``n`` bool) a group
    is permuted only when all its members are visible. Ids outside the table map to themselves."""
    perm = torch.arange(n)
    for g in _groups(table):
        if len(g) < 2 or any(i >= n for i in g):
            continue
        if visible is not None and not all(bool(visible[i]) for i in g):
            continue
        for k, i in enumerate(g):
            perm[i] = g[(k + 1) % len(g)]
    return perm


def flip_points(points: torch.Tensor, anno: int, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Canvas points of the mirrored canvas: ``x -> anno - x``, rows reordered by ``perm``."""
    p = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2).clone()
    p[:, 0] = anno - p[:, 0]
    return p if perm is None else p[perm]


def compact_table(table: Sequence[Group], used: Sequence[int]) -> List[List[int]]:
    """A flip/geo table over the keypoints of a category that are used (``used``: sorted ids, the ids visible in
    some image of the evaluated pairs), indexed by position in ``used``, as the reference builds it: the table as
    is when it has as many ids as ``used``; else each group keeps its used ids, groups left empty are dropped and
    the ids are renumbered ``0, 1, ...`` in the order they appear in the table."""
    groups = _groups(table)
    if sum(len(g) for g in groups) == len(used):
        return groups
    kept = [[i for i in g if i in set(used)] for g in groups]
    out, k = [], 0
    for g in kept:
        if g:
            out.append(list(range(k, k + len(g))))
            k += len(g)
    return out


def mutual_nn_distance(desc_a: torch.Tensor, desc_b: torch.Tensor) -> float:
    """Mean over the mutual nearest neighbours (Euclidean) of ``a``'s rows of their distance to ``b``."""
    d = torch.cdist(desc_a.float()[None], desc_b.float()[None])[0]
    nn_ab, nn_ba = d.argmin(dim=1), d.argmin(dim=0)
    mutual = nn_ba[nn_ab] == torch.arange(d.shape[0], device=d.device)
    return float(d.min(dim=1).values[mutual].mean())


def mask_distance(desc_a: torch.Tensor, desc_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
                  resolution: int = 64, chunk: int = 1024) -> float:
    """How well the object of ``a`` matches the object of ``b``: both ``n x n`` descriptor maps upsampled
    bilinearly to ``resolution``, masks (any size, over the canvas, > 0.5 = object) resized nearest to it, features
    times mask with exact zeros set to ``-1e5``; then the mean over the cells of ``a``'s mask of the smallest
    Euclidean distance to any cell of ``b``. The reference's loop over cells, in chunks."""
    n = _grid_side(desc_a.shape[0])

    def prep(desc: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fmap = desc.float().T.reshape(1, -1, n, n)
        up = F.interpolate(fmap, size=(resolution, resolution), mode="bilinear")[0]
        m = F.interpolate(torch.as_tensor(mask, dtype=torch.float32, device=desc.device)[None, None],
                          size=(resolution, resolution), mode="nearest")[0, 0]
        up = up * m
        up[up == 0] = -100000.0
        return up.reshape(up.shape[0], -1).T, m.reshape(-1)

    fa, ma = prep(desc_a, mask_a)
    fb, _ = prep(desc_b, mask_b)
    rows = fa[ma == 1]
    if rows.shape[0] == 0:
        return float("nan")
    # nearest target cell by the matrix-product form of the distance, then its distance computed directly
    # (the reference's ``norm(tgt - src)``), so the value does not carry the product form's round-off
    nearest = torch.cat([torch.cdist(rows[s:s + chunk], fb).argmin(dim=1) for s in range(0, rows.shape[0], chunk)])
    mins = torch.linalg.norm(fb[nearest] - rows, dim=1)
    return float(mins.mean())


def choose_orientation(pred: torch.Tensor, pred_flip: torch.Tensor, visible: torch.Tensor, table_perm: torch.Tensor,
                       flip_dist: float, original_dist: float) -> Tuple[torch.Tensor, bool]:
    """The reference's ``optimized_kps_1_to_2``: when ``flip_dist < original_dist`` keypoint ``i`` takes the flipped
    source's prediction if it and its twin ``table_perm[i]`` are both visible in source and target (``visible``:
    ``n`` bool, mutual visibility); returns ``(predictions, flipped)``."""
    flipped = bool(flip_dist < original_dist)
    if not flipped:
        return pred, False
    vis = torch.as_tensor(visible, dtype=torch.bool)
    use = vis & vis[table_perm]
    out = pred.clone()
    out[use] = pred_flip[use]
    return out, True


def align_and_transfer(desc_src: torch.Tensor, desc_flip: Optional[torch.Tensor], desc_trg: torch.Tensor,
                       points: torch.Tensor, visible: torch.Tensor, table: Sequence[Group], anno: int,
                       pose_align: str = "flip-mutual-nn", refine: str = "window-softargmax", window: int = 5,
                       beta: float = 0.02, masks: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, bool, Optional[float], Optional[float]]:
    """Source canvas points ``Kx2`` (one row per keypoint id of ``table``; ``visible``: ``K`` bool, visible in both
    images) -> target canvas points, with GeoAware-SC's pose alignment: the mirrored source (``desc_flip``, from the
    mirrored image) is matched with the ids permuted by ``table``, and its predictions are kept (for the ids whose
    twin is visible too) when its distance to the target is smaller: ``flip-mask`` (``masks`` = source, mirrored
    source and target masks) or ``flip-mutual-nn``. Returns ``(points Kx2, flipped, original distance, flipped
    distance)`` (distances None without pose alignment)."""
    if pose_align not in POSE_ALIGN:
        raise InvalidArgumentError(f"unknown pose alignment {pose_align!r}; choose from {', '.join(POSE_ALIGN)}")
    tr = dict(anno=anno, refine=refine, window=window, beta=beta)
    pred = transfer_canvas_points(desc_src, desc_trg, points, **tr)
    if pose_align == "none":
        return pred, False, None, None
    if desc_flip is None:
        raise InvalidArgumentError("pose alignment needs the descriptors of the mirrored source")
    k = points.shape[0]
    vis = torch.as_tensor(visible, dtype=torch.bool)
    pred_flip = transfer_canvas_points(desc_flip, desc_trg, flip_points(points, anno, flip_permutation(table, k, vis)),
                                       **tr)
    if pose_align == "flip-mutual-nn":
        d0, d1 = mutual_nn_distance(desc_src, desc_trg), mutual_nn_distance(desc_flip, desc_trg)
    else:
        if masks is None:
            raise InvalidArgumentError("flip-mask pose alignment needs object masks")
        m_s, m_f, m_t = masks
        d0, d1 = mask_distance(desc_src, desc_trg, m_s, m_t), mask_distance(desc_flip, desc_trg, m_f, m_t)
    out, flipped = choose_orientation(pred, pred_flip, vis, flip_permutation(table, k), d1, d0)
    return out, flipped, d0, d1


@dataclass(frozen=True)
class GeoAwareOptions:
    """GeoAware-SC's matching steps as options of a keypoint transfer (the flags, written once)."""

    pose_align: str = opt("none", "test-time pose alignment (GeoAware-SC): none; flip-mask (also match the mirrored "
                                  "source, keypoint ids permuted by the flip table, and keep the orientation whose "
                                  "masked descriptors are closer to the target's); flip-mutual-nn (the same, "
                                  "judged by the mean distance of mutual nearest neighbours, no masks)",
                          choices=POSE_ALIGN)
    anno_size: int = opt(840, "canvas size (pixels) of the keypoints under pose alignment or window soft-argmax: "
                              "the reference's ANNO_SIZE (840, its argparse default)")
    masks: Optional[str] = opt(None, "object masks for --pose-align flip-mask: a folder holding "
                                     "<category>/<image>_mask.png (and _mask_flip.png; else the mask is mirrored), "
                                     "the reference's layout over its square canvas, or 'saliency' (densevit's "
                                     "CLS-attention saliency of the same pass, thresholded at its mean)")
