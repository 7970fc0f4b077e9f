"""PCK@alpha (percentage of correct keypoints) for keypoint transfer, as the semantic-correspondence field scores it.

A transferred point is correct when its distance to the ground truth is ``<= alpha * size`` (inclusive, as the
standard SPair-71k evaluations: ``torch.le(dist, alpha * pckthres)`` in DHPF/CATs), where ``size`` is
``max(h, w)`` of the target object's bounding box (the SPair standard) or, as an option, of the target image.
A point missing in either image (a non-finite or negative coordinate; SPair and its loaders pad absent points
with negative values) is skipped: it counts neither as correct nor in the denominator.

Two averages: *per point* pools all points of a group (correct points / points) and *per image* averages each
pair's own PCK over the pairs of a group (pairs without any valid point are left out of both).
Each pair is kept as a :class:`PairRecord` (distances + both thresholds + flags), so tables for any alpha,
threshold kind or breakdown are recomputed from the records without rerunning the transfer.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...errors import DensevitError, InvalidArgumentError
from ...io.files import atomic_write_text

ALPHAS: Tuple[float, ...] = (0.05, 0.10, 0.15)
THRESHOLDS = ("bbox", "image")


def bbox_size(bbox: Sequence[float]) -> float:
    """``max(x2 - x1, y2 - y1)`` of an ``(x1, y1, x2, y2)`` box (the SPair PCK reference size)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return max(x2 - x1, y2 - y1)


def image_size(image_hw: Sequence[int]) -> float:
    """``max(h, w)`` of an image (the per-image PCK reference size)."""
    return float(max(image_hw[0], image_hw[1]))


def valid_points(*kps: torch.Tensor) -> torch.Tensor:
    """``N`` bool: the points whose coordinates are finite and non-negative in every given ``Nx2`` array."""
    if not kps:
        raise InvalidArgumentError("valid_points needs at least one keypoint array")
    ok = torch.ones(kps[0].shape[0], dtype=torch.bool)
    for k in kps:
        k = torch.as_tensor(k, dtype=torch.float64).reshape(-1, 2).cpu()
        ok &= torch.isfinite(k).all(dim=1) & (k >= 0).all(dim=1)
    return ok


def keypoint_distances(pred: torch.Tensor, gt: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euclidean distances ``N`` (float64) between ``Nx2`` predictions and ground truth; NaN where the ground
    truth is missing or ``valid`` (``N`` bool, e.g. the source point's validity) is False."""
    pred = torch.as_tensor(pred, dtype=torch.float64).reshape(-1, 2).cpu()
    gt = torch.as_tensor(gt, dtype=torch.float64).reshape(-1, 2).cpu()
    if pred.shape != gt.shape:
        raise InvalidArgumentError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    ok = valid_points(gt)
    if valid is not None:
        ok &= torch.as_tensor(valid, dtype=torch.bool).cpu()
    dist = torch.linalg.vector_norm(pred - gt, dim=1)
    return torch.where(ok & torch.isfinite(dist), dist, torch.full_like(dist, float("nan")))


def pck_counts(dist: torch.Tensor, size: float, alphas: Sequence[float] = ALPHAS) -> Tuple[torch.Tensor, int]:
    """Correct points per alpha (``A`` long) and the number of valid points, for distances ``N`` (NaN =
    skipped) and reference size ``size``: correct iff ``dist <= alpha * size``."""
    dist = torch.as_tensor(dist, dtype=torch.float64).reshape(-1)
    ok = ~torch.isnan(dist)
    d = dist[ok]
    thr = torch.tensor([a * float(size) for a in alphas], dtype=torch.float64)
    return (d[None, :] <= thr[:, None]).sum(dim=1), int(ok.sum())


def pck(pred: torch.Tensor, gt: torch.Tensor, size: float, alpha: float = 0.1,
        valid: Optional[torch.Tensor] = None) -> float:
    """PCK of one pair: the fraction of valid points within ``alpha * size`` (NaN if no point is valid)."""
    correct, n = pck_counts(keypoint_distances(pred, gt, valid), size, (alpha,))
    return float(correct[0]) / n if n else float("nan")


@dataclass
class PairRecord:
    """Everything PCK needs from one evaluated pair (JSON-serialisable; ``dist`` uses None for skipped points)."""

    name: str
    category: str
    dist: List[Optional[float]]
    size_bbox: Optional[float]
    size_image: float
    flags: Dict[str, Union[int, str]] = field(default_factory=dict)
    seconds: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)   # protocol outputs kept per pair (JSON values)

    @classmethod
    def from_prediction(cls, name: str, category: str, pred: torch.Tensor, gt: torch.Tensor,
                        size_bbox: Optional[float], size_image: float, valid: Optional[torch.Tensor] = None,
                        flags: Optional[Mapping[str, Union[int, str]]] = None,
                        seconds: Optional[float] = None) -> "PairRecord":
        d = keypoint_distances(pred, gt, valid)
        return cls(name, category, [None if math.isnan(v) else float(v) for v in d.tolist()],
                   None if size_bbox is None else float(size_bbox), float(size_image), dict(flags or {}), seconds)

    def distances(self) -> torch.Tensor:
        return torch.tensor([float("nan") if v is None else v for v in self.dist], dtype=torch.float64)

    def size(self, threshold: str) -> float:
        if threshold == "bbox":
            if self.size_bbox is None:
                raise DensevitError(f"pair {self.name} has no target bounding box; use the image threshold")
            return self.size_bbox
        if threshold == "image":
            return self.size_image
        raise DensevitError(f"unknown PCK threshold {threshold!r}; choose from {', '.join(THRESHOLDS)}")

    def to_json(self) -> dict:
        return {"name": self.name, "category": self.category, "dist": self.dist, "size_bbox": self.size_bbox,
                "size_image": self.size_image, "flags": self.flags, "seconds": self.seconds, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping) -> "PairRecord":
        known = {"name", "category", "dist", "size_bbox", "size_image", "flags", "seconds"}
        return cls(d["name"], d["category"], list(d["dist"]), d.get("size_bbox"), d["size_image"],
                   dict(d.get("flags") or {}), d.get("seconds"), {k: v for k, v in d.items() if k not in known})


@dataclass
class PCKRow:
    """One line of a PCK table: a group of pairs and its per-point / per-image PCK for each alpha."""

    group: str
    n_pairs: int
    n_points: int
    per_point: Dict[float, float]
    per_image: Dict[float, float]


def _row(group: str, records: Sequence[PairRecord], alphas: Sequence[float], threshold: str) -> PCKRow:
    correct = torch.zeros(len(alphas), dtype=torch.float64)
    n_points, image_pcks = 0, []
    for r in records:
        c, n = pck_counts(r.distances(), r.size(threshold), alphas)
        if n == 0:
            continue
        correct += c
        n_points += n
        image_pcks.append(c.double() / n)
    nan = float("nan")
    per_point = {a: (float(correct[i]) / n_points if n_points else nan) for i, a in enumerate(alphas)}
    if image_pcks:
        mean = torch.stack(image_pcks).mean(dim=0)
        per_image = {a: float(mean[i]) for i, a in enumerate(alphas)}
    else:
        per_image = {a: nan for a in alphas}
    return PCKRow(group, len(image_pcks), n_points, per_point, per_image)


def summarize(records: Iterable[PairRecord], alphas: Sequence[float] = ALPHAS, threshold: str = "bbox",
              breakdown: Sequence[str] = ()) -> List[PCKRow]:
    """PCK rows: one per category (sorted), ``all`` (pooled over every pair), ``mean`` (unweighted mean of the
    category rows, when there are several), then ``flag=value`` rows pooled over categories for each flag
    named in ``breakdown`` (values sorted)."""
    records = list(records)
    by_cat: Dict[str, List[PairRecord]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    rows = [_row(c, by_cat[c], alphas, threshold) for c in sorted(by_cat)]
    all_row = _row("all", records, alphas, threshold)
    out = rows + [all_row]
    valid_rows = [r for r in rows if r.n_pairs]
    if len(valid_rows) > 1:
        def mean(key: str) -> Dict[float, float]:
            return {a: sum(getattr(r, key)[a] for r in valid_rows) / len(valid_rows) for a in alphas}

        out.append(PCKRow("mean", all_row.n_pairs, all_row.n_points, mean("per_point"), mean("per_image")))
    for flag in breakdown:
        values: Dict[str, List[PairRecord]] = {}
        for r in records:
            if flag in r.flags:
                values.setdefault(str(r.flags[flag]), []).append(r)
        for v in sorted(values, key=lambda s: (len(s), s)):
            out.append(_row(f"{flag}={v}", values[v], alphas, threshold))
    return out


def _columns(alphas: Sequence[float]) -> List[str]:
    return ([f"pck_point@{a:g}" for a in alphas] + [f"pck_image@{a:g}" for a in alphas])


def format_table(rows: Sequence[PCKRow], alphas: Sequence[float] = ALPHAS, title: str = "") -> str:
    """A plain-text table (PCK in percent)."""
    head = ["group", "pairs", "points"] + [f"pt@{a:g}" for a in alphas] + [f"img@{a:g}" for a in alphas]
    lines = [[r.group, str(r.n_pairs), str(r.n_points)]
             + [f"{100 * r.per_point[a]:.2f}" for a in alphas] + [f"{100 * r.per_image[a]:.2f}" for a in alphas]
             for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "-" * len(fmt(head))
    out = ([title] if title else []) + [fmt(head), sep] + [fmt(l) for l in lines]
    return "\n".join(out) + "\n(PCK in %: pt = per point, img = per image)"


def write_csv(rows: Sequence[PCKRow], path: Union[str, Path], alphas: Sequence[float] = ALPHAS,
              extra: Optional[Mapping[str, Mapping[str, float]]] = None) -> None:
    """Write the rows as CSV: ``group, n_pairs, n_points, pck_point@a..., pck_image@a...`` (fractions in [0, 1]),
    then the columns of ``extra`` (group -> column -> value; empty for groups it lacks)."""
    extra = dict(extra or {})
    cols = list(dict.fromkeys(c for v in extra.values() for c in v))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["group", "n_pairs", "n_points"] + _columns(alphas) + cols)
    for r in rows:
        more = extra.get(r.group, {})
        w.writerow([r.group, r.n_pairs, r.n_points] + [f"{r.per_point[a]:.6f}" for a in alphas]
                   + [f"{r.per_image[a]:.6f}" for a in alphas]
                   + [f"{more[c]:.6f}" if c in more else "" for c in cols])
    atomic_write_text(path, f.getvalue())
