"""Scores of label propagation beyond object masks, as CRW's evaluation scripts compute them (github
ajabri/videowalk 047f3f4):

- :func:`jhmdb_pck` = ``code/eval/eval_pck.py``: JHMDB pose tracking. A joint counts where the *prediction* has it
  (x >= 0); frame 0 is skipped; the normaliser of a frame is ``0.6 x`` the diagonal of the box of the ground-truth
  joints that the prediction has; correct when ``distance / size <= alpha`` (inclusive); per joint, the
  percentage over every counted (video, frame); the score is the mean of the 15 joints' PCKs.
- :func:`vip_confusion` + :func:`vip_iou` = ``code/eval/eval_vip.py``: VIP part tracking. One 20 x 20 histogram
  (rows ground truth, columns prediction; ground-truth ids outside 0..19 ignored) over every predicted frame, a
  prediction of another size resized to the ground truth's with PIL nearest; per-class IoU, ``nanmean`` over the
  20 classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ...errors import DensevitError

__all__ = ["PCK_ALPHAS", "VIP_CLASSES", "jhmdb_distances", "jhmdb_pck", "vip_frame_hist", "vip_confusion", "vip_iou"]

PCK_ALPHAS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
VIP_CLASSES: Tuple[str, ...] = ("background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat",
                                "socks", "pants", "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm",
                                "left-arm", "right-leg", "left-leg", "right-shoe", "left-shoe")


def jhmdb_distances(pred: np.ndarray, gt: np.ndarray) -> List[np.ndarray]:
    """Per joint, the normalised distances of one video (``eval_pck.py``'s ``distAll`` contribution).

    Args:
        pred: ``T x J x 2`` predicted x/y in pixels (x < 0: the joint is missing).
        gt: ``2 x J x T'`` ground truth, 0-based pixels (``pos_img - 1``); ``T' <= T``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 3 or pred.shape[2] != 2 or gt.ndim != 3 or gt.shape[0] != 2 or gt.shape[1] != pred.shape[1]:
        raise DensevitError(f"predictions T x J x 2 and ground truth 2 x J x T do not match: {pred.shape}, "
                            f"{gt.shape}")
    J, T = gt.shape[1], gt.shape[2]
    if pred.shape[0] < T:
        raise DensevitError(f"{pred.shape[0]} predicted frames for {T} annotated ones")
    P = pred[:T].transpose(2, 1, 0)                          # 2 x J x T, as eval_pck's predres
    visible = P[0] >= 0                                      # J x T
    gx = np.where(visible, gt[0], np.nan)
    gy = np.where(visible, gt[1], np.nan)
    any_vis = visible.any(0)
    with np.errstate(all="ignore"):
        minx = np.where(any_vis, np.nanmin(np.where(visible, gx, np.inf), 0), 1e6)
        maxx = np.where(any_vis, np.nanmax(np.where(visible, gx, -np.inf), 0), -1)
        miny = np.where(any_vis, np.nanmin(np.where(visible, gy, np.inf), 0), 1e6)
        maxy = np.where(any_vis, np.nanmax(np.where(visible, gy, -np.inf), 0), -1)
    # the reference's box starts at (1e6, -1): a box smaller than that start keeps it
    minx, miny = np.minimum(minx, 1e6), np.minimum(miny, 1e6)
    maxx, maxy = np.maximum(maxx, -1), np.maximum(maxy, -1)
    size = np.array([0.6 * np.linalg.norm(np.subtract([maxx[k], maxy[k]], [minx[k], miny[k]])) for k in range(T)])
    out = []
    for j in range(J):
        ks = [k for k in range(1, T) if visible[j, k]]
        d = np.array([np.linalg.norm(np.subtract([P[0, j, k], P[1, j, k]], [gt[0, j, k], gt[1, j, k]]))
                      for k in ks], dtype=np.float64)
        with np.errstate(all="ignore"):
            out.append(d / size[ks] if ks else np.zeros(0))
    return out


def jhmdb_pck(distances: Sequence[Sequence[np.ndarray]], alphas: Sequence[float] = PCK_ALPHAS
              ) -> Dict[float, np.ndarray]:
    """PCK of the pooled distances of several videos (each :func:`jhmdb_distances`): for each alpha, ``J + 1``
    percentages, the joints' and (last) their mean (``eval_pck.py``'s ``computePCK``). A joint never counted
    has PCK NaN (the reference divides by zero)."""
    if not distances:
        raise DensevitError("no videos to score")
    J = len(distances[0])
    pooled = [np.concatenate([np.asarray(v[j], dtype=np.float64) for v in distances]) for j in range(J)]
    out = {}
    for a in alphas:
        pck = np.array([100.0 * np.count_nonzero(d <= a) / len(d) if len(d) else np.nan for d in pooled])
        out[a] = np.append(pck, np.mean(pck))
    return out


def _open_png(path: Union[str, Path]) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except OSError as exc:                                   # PIL's UnidentifiedImageError is an OSError
        raise DensevitError(f"cannot read the label image {path}: {exc}") from None
    return img


def _read_ids(path: Path) -> np.ndarray:
    return np.array(_open_png(path), dtype=np.int32)


def vip_frame_hist(pred_png: Union[str, Path], gt_png: Union[str, Path], n_classes: int = 20) -> np.ndarray:
    """The ``n x n`` histogram (rows ground truth, columns prediction) of one frame (``eval_vip.py``: the
    prediction read as ``cv2.imread`` reads it, resized to the ground truth's size with PIL nearest; ground-truth
    ids outside ``0..n-1`` ignored)."""
    label = _read_ids(Path(gt_png))
    img = _open_png(pred_png)
    if img.mode != "L":                                      # the reference reads it with cv2.imread: colour
        img = img.convert("RGB").getchannel("R")
    if img.size != (label.shape[1], label.shape[0]):
        img = img.resize((label.shape[1], label.shape[0]), Image.NEAREST)
    pred = np.array(img, dtype=np.int32)
    if pred.max(initial=0) >= n_classes or pred.min(initial=0) < 0:
        raise DensevitError(f"{pred_png}: predicted ids outside 0..{n_classes - 1}")
    k = (label >= 0) & (label < n_classes)
    return np.bincount(n_classes * label[k].astype(int) + pred[k], minlength=n_classes ** 2
                       ).reshape(n_classes, n_classes).astype(np.float64)


def vip_confusion(pred_dir: Union[str, Path], gt_dir: Union[str, Path], n_classes: int = 20,
                  videos: Iterable[str] = ()) -> Tuple[np.ndarray, List[str]]:
    """The histogram of every ``pred_dir/<video>/<frame>.png`` against ``gt_dir/<video>/<frame>.png``
    (``eval_vip.py``'s ``compute_hist``; ``videos``: only these). Returns the histogram and the frames without
    ground truth (skipped; the reference stops on them)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    wanted = set(videos)
    hist = np.zeros((n_classes, n_classes))
    missing = []
    for vid in sorted(p for p in pred_dir.iterdir() if p.is_dir() and (not wanted or p.name in wanted)):
        for png in sorted(vid.glob("*.png")):
            gt_path = gt_dir / vid.name / png.name
            if not gt_path.is_file():
                missing.append(f"{vid.name}/{png.name}")
                continue
            hist += vip_frame_hist(png, gt_path, n_classes)
    return hist, missing


def vip_iou(hist: np.ndarray) -> Tuple[np.ndarray, float]:
    """Per-class IoU of a histogram and their ``nanmean`` (``eval_vip.py``'s ``show_result``)."""
    hist = np.asarray(hist, dtype=np.float64)
    with np.errstate(all="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    return iu, float(np.nanmean(iu)) if np.isfinite(iu).any() else float("nan")
