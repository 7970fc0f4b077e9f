"""Video object propagation by label transfer on ViT patch features (the protocol of DINO's DAVIS evaluation).

For every frame after the first, each patch token takes the labels of its most similar tokens in a context of
frames: the first frame (with the given mask) and the ``n_last_frames`` preceding frames (with their propagated
soft labels). Defaults are DINO's (Caron et al. 2021, ``eval_video_segmentation.py``):

- features: the last block's patch tokens after the final norm (facet ``token_norm`` of layer -1), L2-normalised;
- frames resized (bilinear) so the short side is ``short_side`` = 480 and the long side is floored to a
  multiple of ``multiple`` = 64; the first mask is sampled at the token centres (nearest pixel);
- context = first frame + ``n_last_frames`` = 7 preceding frames;
- affinity ``exp(cos / temperature)``, ``temperature`` = 0.1, between a query token and the context tokens
  within ``neighborhood`` = 12 tokens of its grid position (``|drow|, |dcol| <= 12``, in every context frame);
- the ``topk`` = 5 strongest affinities over the whole context are kept per query and the labels are their
  affinity-weighted mean (the weights normalised to sum to 1; older frames' labels are soft);
- the label maps are upsampled bilinearly to the frame's full (original) resolution, each label channel is
  min-max normalised (``minmax_norm``, as DINO's ``norm_mask``), and the argmax is the object id.

Two deliberate differences from DINO's script: normalisation uses the backbone's mean/std (DINO's script uses
std 0.228 for red), and the bilinear upsampling goes straight to the original frame size (DINO upsamples to
the network input and then resizes the argmax with nearest neighbour).

Speed: features come once per frame from batched forward passes; the neighbourhood is restricted by tiling
the query grid (``tile`` x ``tile`` tokens) and comparing each tile with the window of keys around it, so no
dense T x T mask or similarity matrix is built; only the context frames' features and labels are kept.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.errors import DensevitError
from densevit.features.frames import InputRule, frame_size, load_input
from densevit.features.upsampled import UpsampleOptions
from densevit.features.options import facet_opt, layer_opt
from densevit.models.grid import TokenGrid
from densevit.options import opt
from densevit.upsample import check_method, upsample_tokens

FrameLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass(frozen=True)
class VOSConfig(UpsampleOptions):
    """Propagation parameters (defaults: DINO's DAVIS protocol).

    Attributes:
        short_side: the frame's shorter side is resized to this many pixels.
        multiple: the longer side is floored to a multiple of this (1: keep the aspect ratio as closely as
            possible).
        n_last_frames: context frames besides the first one (the most recent ones).
        neighborhood: keys are restricted to within this many tokens of the query's grid position
            (row and column); 0 or less: no restriction.
        topk: neighbours per query token, over all context frames together.
        temperature: affinity ``exp(cos / temperature)``; the weights are the affinities of the top-k
            normalised to sum to 1.
        layer, facet: the features (default: last block, tokens through the final norm).
        minmax_norm: min-max normalise each upsampled label channel before the argmax (as DINO).
        batch_size: frames per forward pass of the backbone.
        tile: query tile side in tokens for the neighbourhood search (speed/memory only, not results).
    """

    short_side: int = opt(480, "resize the shorter frame side to this (DINO's protocol: 480)", flag="--load-size",
                          hidden_aliases=("--short-side",))
    multiple: int = opt(64, "floor the longer side to a multiple of this (1: keep the aspect ratio)")
    n_last_frames: int = opt(7, "context: the first frame plus this many preceding frames")
    neighborhood: int = opt(12, "only match tokens within this many tokens of the query position (0: anywhere)")
    topk: int = opt(5, "neighbours per token over the whole context")
    temperature: float = opt(0.1, "affinity exp(cos / temperature)")
    layer: int = layer_opt(-1)
    facet: str = facet_opt("token_norm")
    minmax_norm: bool = opt(True, "skip the per-label min-max normalisation before the argmax",
                            flag="--no-minmax-norm", invert=True)
    batch_size: int = opt(8, "frames per forward pass")
    tile: int = opt(16, "query tile side in tokens for the neighbourhood search (speed/memory only)", cli=False)
    upsample_factor: int = opt(2, "with --upsample: propagate on cells of patch/f pixels (f divides the patch; "
                                  "the neighbourhood grows f times, in tokens, to cover the same area)")

    def validate(self) -> None:
        if self.short_side < 1 or self.multiple < 1:
            raise DensevitError("short side and multiple must be positive")
        if self.n_last_frames < 0:
            raise DensevitError("the number of preceding context frames cannot be negative")
        check_method(self.upsample, allow_none=True)
        if self.upsample_factor < 1:
            raise DensevitError("the upsampling factor must be at least 1")
        if self.topk < 1:
            raise DensevitError("top-k must be at least 1")
        if not self.temperature > 0:
            raise DensevitError("temperature must be positive")
        if self.batch_size < 1 or self.tile < 1:
            raise DensevitError("batch size and tile must be positive")


# ---------------------------------------------------------------------------------------------------- frames
def input_size(image_hw: Tuple[int, int], short_side: int = 480, multiple: int = 64) -> Tuple[int, int]:
    """Network input ``(H, W)`` for a frame of ``image_hw``: shorter side ``short_side``, longer side
    ``short_side * aspect`` floored to a multiple of ``multiple`` (DINO's ``read_frame``; at least one multiple)."""
    h0, w0 = image_hw
    if h0 > w0:
        long = (short_side * h0) / w0
        return max(int((long // multiple) * multiple), multiple), short_side
    long = (short_side * w0) / h0
    return short_side, max(int((long // multiple) * multiple), multiple)


def load_frame(frame: FrameLike, input_hw: Tuple[int, int], mean: Sequence[float], std: Sequence[float]
               ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Read one frame, resize it bilinearly to ``input_hw`` (as DINO, with OpenCV) and normalise it.

    Returns ``(x 3xHxW, original (H0, W0))``.
    """
    x, _, hw = load_input(frame, InputRule("exact", tuple(input_hw)), mean, std, 1)
    return x, hw


# ---------------------------------------------------------------------------------------------------- labels
def mask_to_labels(mask: np.ndarray, grid: TokenGrid, ids: Sequence[int]) -> torch.Tensor:
    """One-hot labels ``TxC`` of the tokens: the mask ``H0xW0`` read at each token centre (nearest pixel,
    which is what DINO's nearest-neighbour downsampling of the mask does); channel ``c`` is object ``ids[c]``."""
    mask = np.asarray(mask)
    H0, W0 = mask.shape
    xy = grid.token_centers()
    cols = xy[:, 0].floor().long().clamp(0, W0 - 1).numpy()
    rows = xy[:, 1].floor().long().clamp(0, H0 - 1).numpy()
    lut = np.full(256, -1, dtype=np.int64)
    lut[np.asarray(ids, dtype=np.int64)] = np.arange(len(ids))
    chan = torch.from_numpy(lut[mask[rows, cols]])
    if (chan < 0).any():
        raise DensevitError("mask has ids missing from the id list")
    return F.one_hot(chan, len(ids)).float()


def upsample_grid(grid: TokenGrid, device: torch.device) -> torch.Tensor:
    """``grid_sample`` coordinates ``1xH0xW0x2`` that read a token map at each original pixel's centre
    (:meth:`TokenGrid.sampling_grid`), on ``device``."""
    return grid.sampling_grid().to(device)


def labels_to_mask(labels: torch.Tensor, grid: TokenGrid, ids_lut: torch.Tensor, sample_grid: torch.Tensor,
                   minmax_norm: bool = True) -> np.ndarray:
    """Soft token labels ``TxC`` -> id mask ``H0xW0`` uint8: bilinear upsampling to full resolution, optional
    per-channel min-max normalisation, argmax, channel -> id."""
    h, w = grid.shape
    maps = labels.T.reshape(1, -1, h, w).float()
    up = F.grid_sample(maps, sample_grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    if minmax_norm:
        flat = up.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        rng = hi - lo
        scale = torch.where(rng > 0, rng, torch.ones_like(rng))
        normed = (up - lo[:, None, None]) / scale[:, None, None]
        constant = ((rng <= 0) & (hi > 0))[:, None, None]     # a constant positive channel: all 1
        normed = torch.where(constant, torch.ones_like(normed), normed)
        up = torch.where((hi > 0)[:, None, None], normed, up)
    return ids_lut[up.argmax(dim=0)].cpu().numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- affinity
class LocalTopK:
    """Top-k most similar keys of every query token among the keys within ``radius`` tokens (row and column)
    of its own grid position, for an ``h x w`` token grid.

    Large grids: the query grid is cut into ``tile x tile`` tiles; each tile is compared with the
    ``(tile + 2r)^2`` keys around it in one batched matmul and the keys outside each query's own window are
    masked, so the cost is about ``T * (tile + 2r)^2 * D`` per frame pair, never ``T^2``. Small grids (where
    that window is not much smaller than the grid) compare densely and mask with one ``TxT`` mask built once.
    ``radius <= 0`` (or a window covering the grid) means no restriction.
    """

    def __init__(self, hw: Tuple[int, int], radius: int, tile: int = 16, device: torch.device | str = "cpu",
                 max_elems: int = 1 << 24) -> None:
        self.h, self.w = hw
        self.T = self.h * self.w
        self.device = torch.device(device)
        self.max_elems = max_elems
        self.outside: Optional[torch.Tensor] = None
        r = int(radius)
        if r <= 0 or r >= max(self.h, self.w) - 1:
            self.mode = "dense"
            return
        t = max(1, min(int(tile), max(self.h, self.w)))
        K = t + 2 * r
        # tiles cost ~K^2 keys a query plus a gather of K^2 keys a tile; dense costs T keys a query
        if self.T <= 1.5 * K * K and self.T <= 4096:
            self.mode = "masked"
            rows, cols = torch.arange(self.T) // self.w, torch.arange(self.T) % self.w
            near = ((rows[:, None] - rows[None]).abs() <= r) & ((cols[:, None] - cols[None]).abs() <= r)
            self.outside = (~near).to(self.device)
            return
        self.mode = "tiles"
        nth, ntw = math.ceil(self.h / t), math.ceil(self.w / t)
        Hp, Wp = nth * t, ntw * t
        tok = torch.arange(self.T).view(self.h, self.w)
        kmap = torch.full((Hp + 2 * r, Wp + 2 * r), -1, dtype=torch.long)
        kmap[r:r + self.h, r:r + self.w] = tok
        qmap = torch.full((Hp, Wp), -1, dtype=torch.long)
        qmap[:self.h, :self.w] = tok
        key_idx = kmap.unfold(0, K, t).unfold(1, K, t).reshape(nth * ntw, K * K)          # tiles x K^2
        query_idx = qmap.unfold(0, t, t).unfold(1, t, t).reshape(nth * ntw, t * t)         # tiles x t^2
        qi, qj = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
        ki, kj = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
        di = ki.reshape(1, -1) - r - qi.reshape(-1, 1)
        dj = kj.reshape(1, -1) - r - qj.reshape(-1, 1)
        window = (di.abs() <= r) & (dj.abs() <= r)                                          # t^2 x K^2
        self.invalid = (~(window[None] & (key_idx[:, None, :] >= 0))).to(self.device)      # tiles x t^2 x K^2
        # padding positions gather token 0: padded keys are masked, padded queries dropped
        self.key_idx = key_idx.clamp(min=0).to(self.device)
        self.query_idx = query_idx.clamp(min=0).to(self.device)
        order = query_idx.reshape(-1)
        self._keep = (order >= 0).to(self.device)
        self._order = order[order >= 0].to(self.device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q, k``: ``TxD`` (L2-normalised) features of the query and one key frame.
        Returns ``(sims TxK', idx TxK')`` with ``K' = min(topk, keys)``; missing neighbours have sim -inf."""
        if self.mode != "tiles":
            return self._dense(q, k, topk)
        n_tiles, tq = self.query_idx.shape
        nk = self.key_idx.shape[1]
        kk = min(topk, nk)
        step = max(1, self.max_elems // (tq * nk))
        vals, idxs = [], []
        for s in range(0, n_tiles, step):
            ki = self.key_idx[s:s + step]
            S = torch.bmm(q[self.query_idx[s:s + step]], k[ki].transpose(1, 2))   # n x t^2 x K^2
            S.masked_fill_(self.invalid[s:s + step], float("-inf"))
            v, loc = S.topk(kk, dim=-1)
            idxs.append(torch.gather(ki[:, None, :].expand(-1, tq, -1), 2, loc))
            vals.append(v)
        out_v = torch.empty(self.T, kk, dtype=q.dtype, device=q.device)
        out_i = torch.empty(self.T, kk, dtype=torch.long, device=q.device)
        out_v[self._order] = torch.cat(vals).reshape(-1, kk)[self._keep]
        out_i[self._order] = torch.cat(idxs).reshape(-1, kk)[self._keep]
        return out_v, out_i

    def _dense(self, q: torch.Tensor, k: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
        kk = min(topk, k.shape[0])
        step = max(1, self.max_elems // max(k.shape[0], 1))
        vals, idxs = [], []
        for s in range(0, q.shape[0], step):
            S = q[s:s + step] @ k.T
            if self.outside is not None:
                S.masked_fill_(self.outside[s:s + step], float("-inf"))
            v, i = S.topk(kk, dim=1)
            vals.append(v)
            idxs.append(i)
        return torch.cat(vals), torch.cat(idxs)


def propagate_labels(query: torch.Tensor, keys: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                     search: LocalTopK, topk: int = 5, temperature: float = 0.1) -> torch.Tensor:
    """Labels ``TxC`` of a query frame from context frames.

    Args:
        query: ``TxD`` L2-normalised features of the frame to label.
        keys: per context frame, ``TxD`` L2-normalised features; labels: per context frame, ``TxC``.
    Returns:
        ``sum_j w_j * labels_j`` over the ``topk`` most similar context tokens (within the neighbourhood), with
        ``w = exp(sim / temperature)`` normalised to sum to 1.
    """
    T = query.shape[0]
    vals, idxs = [], []
    for f, k in enumerate(keys):
        v, i = search(query, k, topk)
        vals.append(v)
        idxs.append(i + f * T)
    v, pos = torch.cat(vals, 1).topk(min(topk, sum(x.shape[1] for x in vals)), dim=1)
    idx = torch.gather(torch.cat(idxs, 1), 1, pos)
    w = torch.softmax(v / temperature, dim=1)                               # T x k (exp normalised)
    all_labels = torch.cat(list(labels), 0)                                 # (n*T) x C
    return torch.einsum("tk,tkc->tc", w, all_labels[idx])


# ---------------------------------------------------------------------------------------------------- videos
def check_frame_sizes(sizes: Sequence[Tuple[int, int]], start: int, image_hw: Tuple[int, int]) -> int:
    """Refuse a frame (numbered from ``start``) whose ``(H, W)`` is not the first frame's; returns the next number."""
    for j, hw in enumerate(sizes, start):
        if tuple(hw) != tuple(image_hw):
            raise DensevitError(f"frame {j} is {hw[1]}x{hw[0]} but the first frame is "
                                f"{image_hw[1]}x{image_hw[0]}; all frames of a video must have one size")
    return start + len(sizes)


def _feature_batches(source, frames: Sequence[FrameLike], input_hw: Tuple[int, int], image_hw: Tuple[int, int],
                     cfg: VOSConfig, upsampled: bool = False) -> Iterator[Tuple[torch.Tensor, TokenGrid, TokenGrid]]:
    """``(features TxD, grid, patch grid)`` of each frame from ``source``'s batched call (DINO's resize to ``input_hw``):
    L2-normalised float32 on the source's device; with ``upsampled``, upsampled with ``cfg.upsample`` onto
    :func:`dense_grid` guided by the frames (the grid is then the dense one)."""
    rule = InputRule("exact", tuple(input_hw))
    start = 0
    for b in source.frames_features(frames, rule, (cfg.layer,), (cfg.facet,), batch_size=cfg.batch_size,
                                    guide=upsampled):
        start = check_frame_sizes(b.images_hw, start, image_hw)
        d, grid = b.descriptors[(cfg.layer, cfg.facet)], b.grid
        if upsampled:
            grid = _dense_or_refuse(grid, cfg)
            d = upsample_tokens(d.float(), b.grid, b.guide, cfg.upsample, out_size=grid.shape, **cfg.options())[0]
        for t in F.normalize(d.float(), dim=-1):
            yield t, grid, b.grid


def _dense_or_refuse(grid: TokenGrid, cfg: VOSConfig) -> TokenGrid:
    if grid.stride != grid.patch_size:
        raise DensevitError(f"--upsample propagates upsampled patch-stride features: leave out --stride "
                            f"(got stride {grid.stride} for patch {grid.patch_size})")
    return dense_grid(grid, cfg.upsample_factor)


def dense_grid(grid: TokenGrid, factor: int) -> TokenGrid:
    """The grid of ``patch / f``-pixel cells over the same input, for the largest ``f <= factor`` that divides the
    patch and tiles exactly the area the patch tokens cover."""
    p, (h, w) = grid.patch_size, grid.shape
    H, W = grid.input_hw
    for f in range(min(factor, p), 0, -1):
        c = p // f
        if p % f == 0 and (H // c, W // c) == (h * f, w * f):
            return TokenGrid(c, c, tuple(grid.input_hw), grid.image_hw)
    return grid


def _frame_size(frame: FrameLike) -> Tuple[int, int]:
    return frame_size(frame)


def object_ids(mask: np.ndarray) -> List[int]:
    """Ids of a first-frame mask, background (0) first, then the object ids in increasing order."""
    ids = sorted(int(i) for i in np.unique(np.asarray(mask)))
    return [0] + [i for i in ids if i != 0]


def propagate(extractor, frames: Sequence[FrameLike], first_mask: np.ndarray, config: VOSConfig = VOSConfig(),
              progress: bool = False) -> Iterator[np.ndarray]:
    """Propagate a first-frame mask through a video.

    Args:
        extractor: a :class:`~densevit.features.source.FeatureSource` (a :class:`densevit.ViTExtractor`, whose
            stride sets the token grid, DINO's protocol using the patch size; or anything that runs its
            ``frames_features``; a store refuses DINO's exact resize in one line).
        frames: the frames in order (paths, PIL images or HxWx3 uint8 arrays), all of one size.
        first_mask: ``H0xW0`` object ids of the first frame (0 = background; any ids in 0..255).
        config: protocol parameters (:class:`VOSConfig`).
    Yields:
        The id mask ``H0xW0`` uint8 of every frame in order (the first one is ``first_mask`` itself); ids are
        those of ``first_mask``. Generated lazily, so only the context frames' features are held.
    """
    config.validate()
    if len(frames) == 0:
        raise DensevitError("no frames to propagate through")
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2:
        raise DensevitError(f"the first mask must be a single-channel HxW id image, got shape {first_mask.shape}")
    image_hw = _frame_size(frames[0])
    if tuple(first_mask.shape) != tuple(image_hw):
        raise DensevitError(f"the first mask is {first_mask.shape[1]}x{first_mask.shape[0]} but the frames are "
                            f"{image_hw[1]}x{image_hw[0]}")
    if first_mask.min() < 0 or first_mask.max() > 255:
        raise DensevitError("mask ids must lie in 0..255")
    ids = object_ids(first_mask)
    input_hw = input_size(image_hw, config.short_side, config.multiple)
    feats = _feature_batches(extractor, frames, input_hw, image_hw, config, upsampled=bool(config.upsample))
    first_feat, grid, patch_grid = next(feats)
    radius = config.neighborhood * (grid.shape[0] // patch_grid.shape[0])   # the same area in a denser grid
    device = first_feat.device
    search = LocalTopK(grid.shape, radius, config.tile, device)
    sample_grid = upsample_grid(grid, device)
    ids_lut = torch.tensor(ids, dtype=torch.long, device=device)
    first_labels = mask_to_labels(first_mask, grid, ids).to(device)
    yield first_mask.astype(np.uint8)
    recent: deque = deque(maxlen=config.n_last_frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), initial=1, unit="frame", desc="propagating")
    try:
        for feat, _, _ in feats:
            keys = [first_feat] + [f for f, _ in recent]
            labels = [first_labels] + [l for _, l in recent]
            soft = propagate_labels(feat, keys, labels, search, config.topk, config.temperature)
            if config.n_last_frames > 0:
                recent.append((feat, soft))
            mask = labels_to_mask(soft, grid, ids_lut, sample_grid, config.minmax_norm)
            if bar is not None:
                bar.update(1)
            yield mask
    finally:
        if bar is not None:
            bar.close()


def segment_video(extractor, frames: Sequence[FrameLike], first_mask: np.ndarray,
                  config: VOSConfig = VOSConfig(), progress: bool = False) -> List[np.ndarray]:
    """All masks of :func:`propagate` as a list (convenience for short videos)."""
    return list(propagate(extractor, frames, first_mask, config, progress))
