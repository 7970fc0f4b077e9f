"""VIP in the layout CRW's evaluation reads (github ajabri/videowalk ``code/data/vos.py``): a list whose lines
hold a frames folder ``Images/<video>`` and its label folder ``Annotations/Category_ids/<video>`` (class ids 0..19,
greyscale PNGs named as the frames)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

from ...errors import DensevitError
from .jhmdb import _int_sorted

__all__ = ["vip_frames", "vip_labels"]


def vip_frames(folder: Union[str, Path]) -> List[Path]:
    """Every file of the frames folder, in the order of its number (``make_paths``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DensevitError(f"no frames folder {folder}")
    names = _int_sorted([p.name for p in folder.iterdir() if p.is_file()], folder)
    if not names:
        raise DensevitError(f"no frames in {folder}")
    return [folder / n for n in names]


def vip_labels(folder: Union[str, Path]) -> List[Path]:
    """The label files (not ``.npy`` caches) in the order of their number; the first belongs to frame 0."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DensevitError(f"no label folder {folder}")
    names = _int_sorted([p.name for p in folder.iterdir() if p.is_file() and "npy" not in p.name], folder)
    if not names:
        raise DensevitError(f"no label images in {folder}")
    return [folder / n for n in names]
