"""DAVIS video-segmentation measures, as the official toolkit computes them.

Follows ``davis2017-evaluation`` (``davis2017/metrics.py``, ``utils.py``, ``evaluation.py``):

- region similarity **J**: intersection over union; an empty prediction of an empty object scores 1;
- boundary accuracy **F**: one-pixel boundary maps (``seg2bmap``), each dilated by a disk of radius
  ``ceil(0.008 * image diagonal)`` (``bound_th``; values >= 1 are taken as pixels), precision = predicted
  boundary pixels within reach of the ground-truth boundary, recall the converse, F = their harmonic mean;
- per object: **mean**, **recall** (fraction of frames scoring > 0.5) and **decay** (mean of the first of four
  quantile bins of frames minus the mean of the last);
- semi-supervised protocol: the first frame (given) and the last frame are not scored.

The toolkit's ``void`` handling compares boolean masks to 255 and so never marks a pixel void; the evaluation
below does the same (the ``void`` arguments exist for completeness).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ...errors import DensevitError

BOUND_TH = 0.008


def db_eval_iou(gt: np.ndarray, pred: np.ndarray, void: Optional[np.ndarray] = None) -> np.ndarray | float:
    """Jaccard index of binary masks ``...xHxW`` (any leading dims); 1 where both are empty."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise DensevitError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    inter = np.sum(gt & pred & keep, axis=(-2, -1))
    union = np.sum((gt | pred) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map ``HxW`` bool of a segmentation (nonzero = object).

    A pixel is a boundary pixel when it differs from its east, south or south-east neighbour; the last row only
    compares with the east neighbour, the last column with the south one (out of range there, so compares with 0),
    and the bottom-right pixel is never a boundary pixel (the toolkit's exact conventions).
    """
    seg = np.asarray(seg) > 0
    if seg.ndim != 2:
        raise DensevitError(f"seg2bmap expects a 2-D mask, got shape {seg.shape}")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: float) -> np.ndarray:
    """Disk structuring element ``(2r+1)x(2r+1)`` uint8: ``x^2 + y^2 <= r^2`` (as ``skimage.morphology.disk``)."""
    r = int(radius)
    L = np.arange(-r, r + 1)
    X, Y = np.meshgrid(L, L)
    return (X ** 2 + Y ** 2 <= radius ** 2).astype(np.uint8)


def boundary_tolerance(hw: Tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Matching tolerance in pixels: ``bound_th`` itself if >= 1, else ``ceil(bound_th * diagonal)``."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(hw[0], hw[1])))


def f_measure(pred: np.ndarray, gt: np.ndarray, void: Optional[np.ndarray] = None,
              bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one binary prediction ``HxW`` against one binary ground truth ``HxW``."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise DensevitError(f"f_measure expects two HxW masks of one size, got {pred.shape} and {gt.shape}")
    if void is not None:
        keep = ~np.asarray(void, bool)
        pred, gt = pred & keep, gt & keep
    se = disk(boundary_tolerance(pred.shape, bound_th))
    fg_b = seg2bmap(pred)
    gt_b = seg2bmap(gt)
    fg_dil = cv2.dilate(fg_b.astype(np.uint8), se) > 0
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), se) > 0
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(np.sum(fg_b & gt_dil)) / n_fg
        recall = float(np.sum(gt_b & fg_dil)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_eval_boundary(gt: np.ndarray, pred: np.ndarray, void: Optional[np.ndarray] = None,
                     bound_th: float = BOUND_TH) -> np.ndarray | float:
    """Boundary F of ``HxW`` or ``FxHxW`` binary masks (one value per frame)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise DensevitError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    if gt.ndim == 2:
        return f_measure(pred, gt, void, bound_th)
    if gt.ndim != 3:
        raise DensevitError(f"boundary measure supports HxW or FxHxW masks, got {gt.ndim} dimensions")
    return np.array([f_measure(pred[i], gt[i], None if void is None else void[i], bound_th)
                     for i in range(gt.shape[0])])


def db_statistics(per_frame: Sequence[float], n_bins: int = 4) -> Tuple[float, float, float]:
    """``(mean, recall, decay)`` of per-frame values, as the toolkit (NaNs ignored).

    Decay: the frames are split into ``n_bins`` overlapping quantile bins (bin edges
    ``round(linspace(1, n, n_bins + 1)) - 1``, each bin including its right edge); decay is the mean of the first
    bin minus the mean of the last. (The toolkit casts the edges to uint8, which only matters beyond 256 frames;
    here they are plain integers.)
    """
    v = np.asarray(per_frame, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(v))
        recall = float(np.nanmean(v > 0.5))
        ids = (np.round(np.linspace(1, len(v), n_bins + 1) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i]: ids[i + 1] + 1] for i in range(n_bins)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))
    return mean, recall, decay


def split_objects(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """Label maps ``FxHxW`` (0 = background, ids 1..K) -> one binary mask per object ``KxFxHxW``."""
    labels = np.asarray(labels)
    ids = np.arange(1, n_objects + 1).reshape(-1, *([1] * labels.ndim))
    return labels[None] == ids


def evaluate_semisupervised(gt: np.ndarray, pred: np.ndarray, n_objects: Optional[int] = None,
                            bound_th: float = BOUND_TH, exclude_first_last: bool = True
                            ) -> Tuple[np.ndarray, np.ndarray]:
    """J and F of every object in every scored frame of one sequence.

    Args:
        gt: ``FxHxW`` ground-truth ids (0 background, 1..K objects; void already mapped to 0).
        pred: ``FxHxW`` predicted ids.
        n_objects: K (default: the largest id in the first ground-truth frame, as the toolkit).
        exclude_first_last: drop the first and last frames (the semi-supervised protocol).
    Returns:
        ``(J, F)``, each ``K x F'`` (``F' = F - 2`` with the exclusion).
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise DensevitError(f"ground truth {gt.shape} and prediction {pred.shape} must both be FxHxW of one size")
    K = int(gt[0].max()) if n_objects is None else int(n_objects)
    if exclude_first_last:
        gt, pred = gt[1:-1], pred[1:-1]
    if pred.size and int(pred.max()) > K:
        raise DensevitError(f"prediction has object id {int(pred.max())} but the sequence has {K} object(s)")
    J = np.zeros((K, gt.shape[0]))
    Fm = np.zeros((K, gt.shape[0]))
    for k in range(1, K + 1):
        g, p = gt == k, pred == k
        J[k - 1] = db_eval_iou(g, p)
        Fm[k - 1] = db_eval_boundary(g, p, bound_th=bound_th)
    return J, Fm


@dataclass
class DavisScores:
    """Per-object statistics of a set of sequences, aggregated as the toolkit's ``evaluation.py``."""

    J: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)  # "<seq>_<k>" -> (mean, recall, decay)
    F: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)

    def add_sequence(self, name: str, J: np.ndarray, F: np.ndarray) -> None:
        """Add one sequence's ``K x F'`` per-frame J and F (objects named ``<name>_1 .. <name>_K``)."""
        for k in range(J.shape[0]):
            self.J[f"{name}_{k + 1}"] = db_statistics(J[k])
            self.F[f"{name}_{k + 1}"] = db_statistics(F[k])

    def global_row(self) -> Dict[str, float]:
        """``J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay`` over all objects."""
        j = np.array(list(self.J.values()), dtype=np.float64).reshape(-1, 3)
        f = np.array(list(self.F.values()), dtype=np.float64).reshape(-1, 3)
        jm, jr, jd = (j.mean(axis=0) if len(j) else [float("nan")] * 3)
        fm, fr, fd = (f.mean(axis=0) if len(f) else [float("nan")] * 3)
        return {"J&F-Mean": (jm + fm) / 2, "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}

    def per_object_rows(self) -> List[Dict[str, object]]:
        """One row per object: ``Sequence, J-Mean, F-Mean`` (the toolkit's per-sequence file)."""
        return [{"Sequence": name, "J-Mean": self.J[name][0], "F-Mean": self.F[name][0]} for name in self.J]


GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
