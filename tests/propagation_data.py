"""Small JHMDB- and VIP-layout videos built from the shared DAVIS-2016 frames (for the propagation tests).

Deterministic: the same files on every machine (frames resized with OpenCV's area filter, joints and parts derived
from the DAVIS object masks). The conformance fixture ``tests/fixtures/propagation_crw.npz`` was made from exactly
these videos (see ``tests/test_propagation.py``).

- JHMDB (``Rename_Images/<class>/<video>/00001.png ...`` + ``joint_positions.mat`` with ``pos_img`` 2 x 15 x T,
  1-based pixel coordinates): the 15 joints sit at fixed relative places of the object's bounding box, each moved
  to the nearest object pixel; ``missing_joint`` puts that joint outside the image in frame 0 (as an unlabelled
  joint).
- VIP (``Images/videos/<video>/000001.jpg ...`` + ``Annotations/Category_ids/<video>/000001.png``): the object mask
  split by rows of its bounding box into hair (2), upper-clothes (4) and pants (8); frame 0 alone also has a small
  left-shoe (19) block, a part id absent from the later frames.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

JHMDB_VIDEOS = (("dance", "dance-twirl", 0, 6, (144, 80), None),
                ("ride", "bmx-trees", 10, 5, (120, 90), 3))
VIP_VIDEOS = (("dance", "dance-twirl", 20, 5, (96, 128)),
              ("soap", "soapbox", 0, 5, (128, 72)))


def davis_clip(shared: Path, seq: str, start: int, n: int, size_wh: Tuple[int, int]
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``n`` frames of a DAVIS sequence from ``start`` (RGB uint8 and boolean object mask), resized to
    ``size_wh`` (area filter for the frames, nearest for the masks)."""
    root = Path(shared) / "data" / "davis2016"
    names = sorted(p.stem for p in (root / "JPEGImages" / "480p" / seq).glob("*.jpg"))[start:start + n]
    out = []
    for name in names:
        rgb = np.asarray(Image.open(root / "JPEGImages" / "480p" / seq / f"{name}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(root / "Annotations" / "480p" / seq / f"{name}.png").convert("L")) > 0
        rgb = cv2.resize(rgb, size_wh, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), size_wh, interpolation=cv2.INTER_NEAREST) > 0
        out.append((rgb, mask))
    return out


def joints_in_mask(mask: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """``15 x 2`` 0-based pixel positions: relative bounding-box places ``rel`` moved to the nearest mask pixel."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    want = np.stack([x0 + rel[:, 0] * (x1 - x0), y0 + rel[:, 1] * (y1 - y0)], 1)
    pix = np.stack([xs, ys], 1).astype(np.float64)
    nearest = ((want[:, None, :] - pix[None]) ** 2).sum(-1).argmin(1)
    return pix[nearest]


def make_jhmdb(root: Path, shared: Path, videos: Sequence = JHMDB_VIDEOS) -> Path:
    """Write JHMDB-layout videos under ``root`` and a videowalk-format list (``root/jhmdb_list.txt``)."""
    import scipy.io

    root = Path(root)
    rng = np.random.default_rng(33)
    lines = []
    for cls, seq, start, n, size, missing in videos:
        rel = rng.uniform(0.15, 0.85, size=(15, 2))
        frames = root / "Rename_Images" / cls / seq
        frames.mkdir(parents=True, exist_ok=True)
        pos = np.zeros((2, 15, n))
        for t, (rgb, mask) in enumerate(davis_clip(shared, seq, start, n, size)):
            Image.fromarray(rgb).save(frames / f"{t + 1:05d}.png")
            pos[:, :, t] = (joints_in_mask(mask, rel) + 1 + rng.uniform(0, 0.9, size=(15, 2))).T
        if missing is not None:
            pos[:, missing, 0] = -40.0
        mat = root / "joint_positions" / cls / seq / "joint_positions.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(mat), {"pos_img": pos})
        lines.append(f"{frames} {mat}")
    listing = root / "jhmdb_list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def part_map(mask: np.ndarray, first: bool) -> np.ndarray:
    """Part ids of an object mask: rows of its box split into hair (2), upper-clothes (4), pants (8); ``first``
    adds a left-shoe (19) block at the bottom-left of the box."""
    ys, xs = np.nonzero(mask)
    y0, y1 = ys.min(), ys.max() + 1
    rows = np.arange(mask.shape[0])[:, None]
    ids = np.where(rows < y0 + 0.25 * (y1 - y0), 2, np.where(rows < y0 + 0.6 * (y1 - y0), 4, 8))
    lbl = np.where(mask, ids, 0).astype(np.uint8)
    if first:
        x0 = xs.min()
        lbl[max(y1 - 6, 0):y1, x0:x0 + 6] = 19
    return lbl


def make_vip(root: Path, shared: Path, videos: Sequence = VIP_VIDEOS) -> Path:
    """Write VIP-layout videos under ``root`` and a videowalk-format list (``root/VIP_list.txt``)."""
    root = Path(root)
    lines = []
    for name, seq, start, n, size in videos:
        frames = root / "Images" / "videos" / name
        labels = root / "Annotations" / "Category_ids" / name
        frames.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for t, (rgb, mask) in enumerate(davis_clip(shared, seq, start, n, size)):
            Image.fromarray(rgb).save(frames / f"{t + 1:06d}.jpg", quality=95)
            Image.fromarray(part_map(mask, t == 0)).save(labels / f"{t + 1:06d}.png")
        lines.append(f"{frames} {labels}")
    listing = root / "VIP_list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing
