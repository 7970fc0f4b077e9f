"""Label propagation through a video with soft label maps on the feature grid: object ids, part ids or keypoint
heatmaps, one engine for video object segmentation (DAVIS), part tracking (VIP) and pose tracking (JHMDB).

Two protocol presets (:data:`PROTOCOLS`):

- ``dino``: DINO's DAVIS protocol, :mod:`densevit.apps.vos` (aspect-preserving resize, square neighbourhood,
  context = first frame + the preceding ``n_last_frames``); the default of ``densevit-vos``.
- ``crw``: the label propagation of CRW (Jabri et al. 2020, github ajabri/videowalk ``code/test.py``), step by
  step, as :class:`CRWConfig` documents; the protocol of the JHMDB and VIP benchmarks.

The CRW protocol, as its code computes it (commit 047f3f4):

1. frames: ``cv2.imread``, BGR->RGB, ``/ 255`` (float32), ``cv2.resize`` (bilinear) to ``crop x crop`` whatever the
   aspect ratio, ImageNet mean/std; the video is ``context`` copies of frame 0 followed by every frame;
2. features of the last block's patch tokens after the final norm, L2-normalised over channels, in batches of 5
   frames;
3. the context of a frame: frame 0 (anywhere) plus the ``context`` preceding frames of that padded sequence (so
   the first frames see copies of frame 0), keys of the latter restricted to cells at Euclidean distance
   ``< radius`` (the mask is added as ``-1e10`` before dividing by the temperature);
4. affinities ``<q, k> / temperature``, the top ``topk`` jointly over all context positions, softmax over them; the
   prediction is the weighted sum of their soft labels and stays soft as the context of later frames; frame 0's
   output is its own label map.

Label encodings and read-outs of both benchmarks (:func:`pose_heatmaps`, :func:`pose_readout`,
:func:`part_onehots`, :func:`part_readout`) reproduce ``data/jhmdb.py``, ``data/vos.py`` and ``utils/test_utils.py``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevit.errors import DensevitError
from densevit.features.frames import InputRule
from densevit.features.options import facet_opt, layer_opt
from densevit.options import opt

__all__ = ["PROTOCOLS", "CRWConfig", "crw_features", "crw_propagate", "radius_bias", "label_grid",
           "draw_gaussian", "pose_heatmaps", "pose_readout", "cells_to_pixels", "part_onehots", "part_readout",
           "propagate_soft", "read_label_image", "dino_propagate_soft", "Keypoints", "read_points",
           "track_points", "draw_points"]

PROTOCOLS = ("dino", "crw")
FrameLike = Union[str, Path, np.ndarray]


@dataclass(frozen=True)
class CRWConfig:
    """CRW's label propagation (videowalk ``test.py``); the flag names of the reference in brackets.

    Attributes:
        context: short-term context frames before each frame (``--videoLen``, default 20).
        topk: neighbours over the whole context (``--topk``, 10).
        radius: short-term keys within this Euclidean distance in cells, strictly (``--radius``, 12).
        temperature: softmax temperature of the affinities (``--temperature``, 0.07).
        crop_size: frames resized to ``crop x crop`` (``--cropSize``, 320; a multiple of the patch size).
        layer, facet: the features (last block, tokens through the final norm).
        batch_size: frames per forward pass (the reference: 5).
    """

    context: int = opt(20, "CRW: context frames before each frame (videowalk --videoLen)")
    topk: int = opt(10, "neighbours per cell over the whole context (videowalk --topk)")
    radius: float = opt(12.0, "CRW: short-term keys only within this distance in cells, strictly (videowalk "
                              "--radius)")
    temperature: float = opt(0.07, "softmax temperature of the affinities (videowalk --temperature)")
    crop_size: int = opt(320, "CRW: frames resized to this square size, aspect ratio ignored (videowalk "
                              "--cropSize; a multiple of the patch size)")
    layer: int = layer_opt(-1)
    facet: str = facet_opt("token_norm")
    batch_size: int = opt(5, "frames per forward pass (the reference: 5)", cli=False)

    def validate(self, patch: Optional[int] = None) -> None:
        if self.context < 0:
            raise DensevitError("--context cannot be negative")
        if self.topk < 1:
            raise DensevitError("--topk must be at least 1")
        if not self.temperature > 0:
            raise DensevitError("--temperature must be positive")
        if not self.radius > 0:
            raise DensevitError("--radius must be positive")
        if self.crop_size < 1 or self.batch_size < 1:
            raise DensevitError("--crop-size and the batch size must be positive")
        if patch is not None and self.crop_size % patch:
            raise DensevitError(f"--crop-size {self.crop_size} is not a multiple of the patch size {patch}")


# ---------------------------------------------------------------------------------------------------- frames
def label_grid(crop: int, patch: int) -> Tuple[int, int]:
    """The feature (and label) grid of a ``crop x crop`` frame."""
    return crop // patch, crop // patch


def crw_features(extractor, frames: Sequence[FrameLike], cfg: CRWConfig) -> Iterator[torch.Tensor]:
    """L2-normalised features ``hw x D`` (float32, on the extractor's device) of each frame, ``cfg.batch_size``
    frames per forward pass (the next frames are decoded on worker threads meanwhile)."""
    rule = InputRule("crw", (cfg.crop_size, cfg.crop_size))
    for b in extractor.frames_features(frames, rule, (cfg.layer,), (cfg.facet,), batch_size=cfg.batch_size):
        for t in F.normalize(b.descriptors[(cfg.layer, cfg.facet)].float(), dim=-1):
            yield t


# ---------------------------------------------------------------------------------------------------- affinity
def radius_bias(hw: Tuple[int, int], radius: float, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``hw x hw`` additive mask of the short-term keys: 0 where the cells' Euclidean distance is ``< radius``,
    ``-1e10`` elsewhere (``utils.MaskedAttention``)."""
    h, w = hw
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yx = torch.stack([gy.flatten(), gx.flatten()], 1).float()
    d = ((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1) ** 0.5
    return torch.where(d < radius, 0.0, -1e10).to(device)


def crw_step(query: torch.Tensor, first: Tuple[torch.Tensor, torch.Tensor],
             recent: Sequence[Tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor, topk: int,
             temperature: float, max_elems: int = 1 << 25) -> torch.Tensor:
    """Soft labels ``hw x C`` of one frame from its context (``test.py``'s affinity and prediction).

    Args:
        query: ``hw x D`` L2-normalised features of the frame.
        first: ``(features, labels)`` of frame 0 (keys anywhere).
        recent: ``(features, labels)`` of the short-term context, oldest first (keys within the radius).
        bias: :func:`radius_bias` of the grid.
    """
    keys = [first] + list(recent)
    sims: dict = {}                                      # repeated frames (the copies of frame 0): one matmul
    labels = torch.cat([l for _, l in keys], 0)          # (n*hw) x C
    hw = query.shape[0]
    k = min(topk, len(keys) * hw)
    step = max(1, max_elems // (len(keys) * hw))
    out = []
    for s in range(0, hw, step):
        q = query[s:s + step]
        cols = []
        for j, (f, _) in enumerate(keys):
            if id(f) not in sims or sims[id(f)][0] != s:
                sims[id(f)] = (s, f @ q.T)               # hw_keys x q
            a = sims[id(f)][1]
            cols.append(a if j == 0 else a + bias[:, s:s + step])
        A = torch.cat(cols, 0) / temperature             # (n*hw) x q
        w, idx = torch.topk(A, k, dim=0)
        w = torch.softmax(w, dim=0)
        out.append((labels[idx] * w[..., None]).sum(0))   # q x C
    return torch.cat(out, 0)


def crw_propagate(features: Iterable[torch.Tensor], first_labels: torch.Tensor, hw: Tuple[int, int],
                  cfg: CRWConfig) -> Iterator[torch.Tensor]:
    """Soft label maps ``hw x C`` of every frame (frame 0: ``first_labels`` itself), CRW's protocol.

    ``features``: per frame, ``hw x D`` L2-normalised (e.g. :func:`crw_features`)."""
    feats = iter(features)
    f0 = next(feats)
    first_labels = first_labels.to(f0.device, torch.float32)
    yield first_labels
    bias = radius_bias(hw, cfg.radius, f0.device)
    recent: deque = deque([(f0, first_labels)] * cfg.context, maxlen=cfg.context) if cfg.context else deque()
    for f in feats:
        pred = crw_step(f, (f0, first_labels), list(recent), bias, cfg.topk, cfg.temperature)
        if cfg.context:
            recent.append((f, pred))
        yield pred


def _crw_grid(source, cfg: CRWConfig):
    """The token grid of a ``crop x crop`` frame of ``source`` (the model); a store, which does not hold CRW's
    frames, is refused in one line."""
    if not getattr(source, "runs_model", True):
        raise DensevitError("the crw protocol reads frames with CRW's own resize, which a feature store does not "
                            "hold; use the model (give the weights)")
    return source.grid((cfg.crop_size, cfg.crop_size))


def propagate_soft(extractor, frames: Sequence[FrameLike], first_labels: torch.Tensor, cfg: CRWConfig,
                   progress: bool = False) -> Iterator[torch.Tensor]:
    """:func:`crw_propagate` on the frames' :func:`crw_features` (``first_labels``: ``h x w x C`` or
    ``hw x C`` on the grid of :func:`label_grid`); yields ``h x w x C`` maps."""
    grid = _crw_grid(extractor, cfg)
    if grid.stride != grid.patch_size:
        raise DensevitError(f"the crw protocol propagates patch-stride features: leave out --stride (got stride "
                            f"{grid.stride} for patch {grid.patch_size})")
    patch = grid.patch_size
    cfg.validate(patch)
    if len(frames) == 0:
        raise DensevitError("no frames to propagate through")
    hw = label_grid(cfg.crop_size, patch)
    first = first_labels.reshape(hw[0] * hw[1], -1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), unit="frame", desc="propagating")
    try:
        for pred in crw_propagate(crw_features(extractor, frames, cfg), first, hw, cfg):
            if bar is not None:
                bar.update(1)
            yield pred.reshape(hw[0], hw[1], -1).cpu()
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------------- pose
def draw_gaussian(img: np.ndarray, pt: Sequence[float], sigma: float = 0.5) -> np.ndarray:
    """Paint an unnormalised Gaussian (peak 1, ``6 sigma + 1`` wide) at ``pt = (x, y)`` into ``img`` in place, as
    ``data/jhmdb.py``'s ``draw_labelmap_np`` (corners truncated with ``int``; nothing if entirely outside)."""
    ul = [int(pt[0] - 3 * sigma), int(pt[1] - 3 * sigma)]
    br = [int(pt[0] + 3 * sigma + 1), int(pt[1] + 3 * sigma + 1)]
    if ul[0] >= img.shape[1] or ul[1] >= img.shape[0] or br[0] < 0 or br[1] < 0:
        return img
    size = 6 * sigma + 1
    x = np.arange(0, size, 1, float)
    y = x[:, None]
    c = size // 2
    g = np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * sigma ** 2))
    gx = max(0, -ul[0]), min(br[0], img.shape[1]) - ul[0]
    gy = max(0, -ul[1]), min(br[1], img.shape[0]) - ul[1]
    ix = max(0, ul[0]), min(br[0], img.shape[1])
    iy = max(0, ul[1]), min(br[1], img.shape[0])
    img[iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return img


def pose_heatmaps(points_xy: np.ndarray, image_hw: Tuple[int, int], crop: int, patch: int,
                  sigma: float = 0.5) -> torch.Tensor:
    """Label maps ``h x w x (1 + J)`` of ``J`` keypoints ``points_xy`` (``J x 2``, 0-based pixels of the original
    frame; NaN or outside: unlabelled): channel ``1 + j`` a Gaussian at ``xy * crop / W / patch`` (CRW's
    ``JhmdbSet``, sigma 0.5), channel 0 one where no joint is."""
    H, W = image_hw
    h, w = -(-crop // patch), -(-crop // patch)            # the reference's ceil(crop / mapScale)
    pts = np.asarray(points_xy, dtype=np.float64)
    maps = np.zeros((h, w, len(pts)))
    for j, (x, y) in enumerate(pts):
        if np.isfinite(x) and np.isfinite(y):
            draw_gaussian(maps[:, :, j], (x * float(crop) / float(W) / patch, y * float(crop) / float(H) / patch),
                          sigma)
    t = torch.from_numpy(maps).float()
    return torch.cat([(t.sum(-1) == 0)[..., None] * 1.0, t], dim=-1)


def pose_readout(pred: torch.Tensor, topk: int = 3) -> torch.Tensor:
    """Keypoints ``2 x J`` in cells (x, y) of soft maps ``h x w x (1 + J)``: the weighted mean of each joint's
    ``topk`` strongest cells, -1 where the joint's map is empty (``test_utils.process_pose``)."""
    pred = pred[..., 1:]
    flat = pred.flatten(0, 1)
    k = min(flat.shape[0], topk)
    vals, ids = torch.topk(flat, k=k, dim=0)
    vals = vals / vals.sum(0)[None]
    xx, yy = ids % pred.shape[1], ids // pred.shape[1]
    coord = torch.stack([(xx * vals).sum(0), (yy * vals).sum(0)], dim=0)
    coord[:, flat.sum(0) == 0] = -1
    return coord


def cells_to_pixels(coord: torch.Tensor, image_hw: Tuple[int, int], grid_hw: Tuple[int, int]) -> np.ndarray:
    """``J x 2`` float32 pixels ``x / w * W`` and ``y / h * H`` of cell coordinates ``2 x J`` on an ``h x w`` grid
    (as ``eval_pck.py`` maps them, its ``feat_res`` the grid side; -1 stays negative: a missing joint)."""
    c = coord.cpu().numpy().astype(np.float32)
    H, W = image_hw
    out = np.empty_like(c)
    out[0] = c[0] / float(grid_hw[1]) * W
    out[1] = c[1] / float(grid_hw[0]) * H
    return out.T


# ---------------------------------------------------------------------------------------------------- parts
def read_label_image(path: Union[str, Path]) -> np.ndarray:
    """A label image as the reference reads it: ``cv2.imread`` (``HxWx3`` BGR uint8)."""
    img = cv2.imread(str(path))
    if img is None:
        raise DensevitError(f"cannot read the label image {path}")
    return img


def part_onehots(label: np.ndarray, crop: int, patch: int) -> Tuple[torch.Tensor, np.ndarray]:
    """First-frame part labels as CRW's ``VOSDataset`` makes them: the label image (``HxW`` ids or ``HxWx3`` as
    ``cv2.imread`` gives) resized to ``crop x crop`` with OpenCV's *bilinear* filter (the reference passes
    ``INTER_NEAREST`` in the ``dst`` slot), one channel per distinct value of the result, downsampled bilinearly
    to the grid. Returns ``(h x w x L float32, ids L)``; ``ids`` are the values (blue channel)."""
    lbl = np.asarray(label)
    if lbl.ndim == 2:
        lbl = np.repeat(lbl[..., None], 3, axis=2)
    lbl = cv2.resize(np.ascontiguousarray(lbl.astype(np.uint8)), (crop, crop))
    flat = lbl.reshape(-1, 3)
    lblset = np.unique(flat, axis=0)
    onehot = np.stack([np.all(lbl == ll, axis=-1) for ll in lblset], axis=-1)
    h = w = -(-crop // patch)
    small = cv2.resize(np.float32(onehot), (w, h))
    if small.ndim == 2:
        small = small[..., None]
    return torch.from_numpy(small), lblset[:, 0].astype(np.int64)


def part_readout(pred: torch.Tensor, ids: np.ndarray, crop: int, image_hw: Tuple[int, int]) -> np.ndarray:
    """Class ids ``H x W`` uint8 of soft maps ``h x w x L``: bilinear ``cv2.resize`` to ``crop x crop``, argmax,
    id, then PIL nearest to the original size (``test_utils.dump_predictions`` and ``eval_vip.py``)."""
    p = np.ascontiguousarray(pred.cpu().numpy().astype(np.float32))
    up = cv2.resize(p, (crop, crop))
    if up.ndim == 2:
        up = up[..., None]
    lbl = np.uint8(np.asarray(ids, dtype=np.int32)[np.argmax(up, axis=-1)])
    H, W = image_hw
    if lbl.shape != (H, W):
        lbl = np.asarray(Image.fromarray(lbl).resize((W, H), Image.NEAREST))
    return lbl


# ---------------------------------------------------------------------------------------------------- dino
def dino_propagate_soft(extractor, frames: Sequence[FrameLike], make_labels, cfg, progress: bool = False
                        ) -> Iterator[torch.Tensor]:
    """Soft label maps ``h x w x C`` with DINO's protocol (:mod:`densevit.apps.vos`: aspect-kept resize, square
    neighbourhood, first frame + ``n_last_frames``, top-k over the context, exp-weights normalised).

    ``make_labels(image_hw, input_hw, grid_hw)`` builds the first frame's ``h x w x C`` labels once the grid is
    known; ``cfg`` is a :class:`densevit.apps.vos.VOSConfig` (``upsample`` is not used here)."""
    from .vos import LocalTopK, check_frame_sizes, input_size, propagate_labels

    cfg.validate()
    if len(frames) == 0:
        raise DensevitError("no frames to propagate through")
    input_hw = input_size(_frame_hw(frames[0]), cfg.short_side, cfg.multiple)
    batches = extractor.frames_features(frames, InputRule("exact", tuple(input_hw)), (cfg.layer,), (cfg.facet,),
                                        batch_size=cfg.batch_size)
    first_feat = search = first_labels = None
    recent: deque = deque(maxlen=cfg.n_last_frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), unit="frame", desc="propagating")
    start = 0
    try:
        for b in batches:
            image_hw = b.images_hw[0] if search is None else image_hw
            start = check_frame_sizes(b.images_hw, start, image_hw)
            d = b.descriptors[(cfg.layer, cfg.facet)]
            if search is None:
                h, w = b.grid.shape
                search = LocalTopK((h, w), cfg.neighborhood, cfg.tile, d.device)
                first_labels = make_labels(image_hw, input_hw, (h, w)).reshape(h * w, -1).to(d.device)
            for feat in F.normalize(d.float(), dim=-1):
                if first_feat is None:
                    first_feat, soft = feat, first_labels
                else:
                    keys = [first_feat] + [f for f, _ in recent]
                    labels = [first_labels] + [l for _, l in recent]
                    soft = propagate_labels(feat, keys, labels, search, cfg.topk, cfg.temperature)
                    if cfg.n_last_frames > 0:
                        recent.append((feat, soft))
                if bar is not None:
                    bar.update(1)
                yield soft.reshape(h, w, -1).cpu()
    finally:
        if bar is not None:
            bar.close()


def _frame_hw(frame: FrameLike) -> Tuple[int, int]:
    if isinstance(frame, (str, Path)):
        from densevit.io.images import image_size

        return image_size(frame)
    return tuple(np.asarray(frame).shape[:2])


# ---------------------------------------------------------------------------------------------------- points
@dataclass(frozen=True)
class Keypoints:
    """Named keypoints of the first frame: ``xy`` ``N x 2`` pixels (x, y), ``names`` N strings."""

    xy: np.ndarray
    names: Tuple[str, ...]


def read_points(path: Union[str, Path], image_hw: Tuple[int, int]) -> Keypoints:
    """Keypoints of a JSON file: a list of ``{"x": .., "y": .., "name": ..}`` (name optional) or of ``[x, y]``
    pairs, or ``{"points": <that list>}``; pixels of the first frame, which must contain them."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DensevitError(f"cannot read the points file {path}: {exc}") from None
    if isinstance(data, dict) and "points" in data:
        data = data["points"]
    if not isinstance(data, list):
        raise DensevitError(f"{path}: expected a list of points ({{\"x\": .., \"y\": .., \"name\": ..}} or [x, y])")
    if not data:
        raise DensevitError(f"{path} holds no points")
    xy, names = [], []
    for i, p in enumerate(data):
        if isinstance(p, dict):
            x, y, name = p.get("x"), p.get("y"), p.get("name", str(i))
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            (x, y), name = p, str(i)
        else:
            raise DensevitError(f"{path}: point {i} is neither {{\"x\": .., \"y\": ..}} nor [x, y]")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in (x, y)):
            raise DensevitError(f"{path}: point {i} needs numeric x and y")
        H, W = image_hw
        if not (0 <= x <= W - 1 and 0 <= y <= H - 1):
            raise DensevitError(f"{path}: point {i} ({x}, {y}) lies outside the first frame ({W}x{H} pixels)")
        xy.append((float(x), float(y)))
        names.append(str(name))
    return Keypoints(np.array(xy, dtype=np.float64), tuple(names))


def track_points(extractor, frames: Sequence[FrameLike], points: Keypoints, protocol: str = "dino",
                 vos_cfg=None, crw_cfg: Optional[CRWConfig] = None, progress: bool = False
                 ) -> Iterator[np.ndarray]:
    """Keypoints through a video: Gaussian heatmaps on the grid (:func:`pose_heatmaps`), propagated with the
    protocol, read back with :func:`pose_readout`. Yields ``N x 2`` float pixels per frame (NaN: lost)."""
    if protocol == "crw":
        cfg = crw_cfg or CRWConfig()
        patch = _crw_grid(extractor, cfg).patch_size
        cfg.validate(patch)
        hw = _frame_hw(frames[0])
        first = pose_heatmaps(points.xy, hw, cfg.crop_size, patch)
        grid_hw = label_grid(cfg.crop_size, patch)
        maps = propagate_soft(extractor, frames, first, cfg, progress)
        sizes = ((hw, grid_hw) for _ in frames)
    elif protocol == "dino":
        from .vos import VOSConfig

        cfg = vos_cfg or VOSConfig()
        got: dict = {}

        def make(image_hw, input_hw, grid_hw):
            h, w = grid_hw
            got["hw"], got["grid"] = image_hw, (h, w)
            H, W = image_hw
            # cells of the network input, with the patch of the grid (input_hw = grid * patch)
            scaled = points.xy * np.array([input_hw[1] / W, input_hw[0] / H])
            maps = np.zeros((h, w, len(scaled)))
            for j, (x, y) in enumerate(scaled):
                draw_gaussian(maps[:, :, j], (x * w / input_hw[1], y * h / input_hw[0]))
            t = torch.from_numpy(maps).float()
            return torch.cat([(t.sum(-1) == 0)[..., None] * 1.0, t], dim=-1)

        maps = dino_propagate_soft(extractor, frames, make, cfg, progress)
        sizes = None
    else:
        raise DensevitError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    for m in maps:
        hw, gw = next(sizes) if sizes is not None else (got["hw"], got["grid"])
        px = cells_to_pixels(pose_readout(m), hw, gw).astype(np.float64)
        px[px[:, 0] < 0] = np.nan
        yield px


def draw_points(frame: Image.Image, xy: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The frame ``HxWx3`` uint8 with each point as a filled circle (its own colour, dark outline) and its name."""
    img = np.array(frame.convert("RGB"), dtype=np.uint8)
    H, W = img.shape[:2]
    r = max(3, round(min(H, W) / 80))
    scale = max(0.35, min(H, W) / 700)
    th = max(1, round(scale * 2))
    for i, ((x, y), name) in enumerate(zip(xy, names)):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        hue = int(180 * ((i * 0.618034) % 1.0))
        colour = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        c = (int(round(x)), int(round(y)))
        cv2.circle(img, c, r + 1, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(img, c, r, colour, -1, cv2.LINE_AA)
        org = (min(c[0] + r + 2, W - 1), max(c[1] - r - 2, 10))
        cv2.putText(img, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), th + 2, cv2.LINE_AA)
        cv2.putText(img, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, th, cv2.LINE_AA)
    return img
