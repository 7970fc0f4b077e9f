"""JHMDB in the layout CRW's evaluation reads (github ajabri/videowalk ``code/data/jhmdb.py``): a list whose lines
hold a frames folder ``Rename_Images/<class>/<video>`` (``00001.png`` ...) and its ``joint_positions.mat``
(``pos_img``: 2 x 15 x T, 1-based pixel x/y)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import numpy as np

from ...errors import DensevitError

__all__ = ["read_filelist", "jhmdb_frames", "jhmdb_joints", "video_name"]


def _resolve(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return base / path


def read_filelist(path: Union[str, Path]) -> List[Tuple[Path, Path]]:
    """``(first path, second path)`` of every non-empty line of a videowalk-format list (relative paths: from the
    working folder, else from the list's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DensevitError(f"no file list {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rows = line.split()
        if not rows:
            continue
        if len(rows) < 2:
            raise DensevitError(f"{path}:{n}: expected a frames folder and a label path")
        out.append((_resolve(rows[0], path.parent), _resolve(rows[1], path.parent)))
    if not out:
        raise DensevitError(f"{path} lists no videos")
    return out


def _int_sorted(names: List[str], folder: Path) -> List[str]:
    try:
        return sorted(names, key=lambda x: int(x.split(".")[0]))
    except ValueError:
        raise DensevitError(f"{folder}: frame names must be numbers (as 00001.png)") from None


def jhmdb_frames(folder: Union[str, Path]) -> List[Path]:
    """The frames of a video: names containing ``.png``, in the order of their number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DensevitError(f"no frames folder {folder}")
    names = _int_sorted([n for n in (p.name for p in folder.iterdir()) if ".png" in n], folder)
    if not names:
        raise DensevitError(f"no .png frames in {folder}")
    return [folder / n for n in names]


def jhmdb_joints(mat: Union[str, Path]) -> np.ndarray:
    """Ground-truth joints ``2 x J x T`` in 0-based pixels (``pos_img - 1``)."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        pos = scipy.io.loadmat(str(mat))["pos_img"]
    except (OSError, ValueError, KeyError, MatReadError) as exc:      # MatReadError: not a MAT file
        raise DensevitError(f"cannot read pos_img from {mat}: {exc}") from None
    pos = np.asarray(pos, dtype=np.float64)
    if pos.ndim != 3 or pos.shape[0] != 2:
        raise DensevitError(f"{mat}: pos_img must be 2 x joints x frames, got {pos.shape}")
    return pos - 1


def video_name(frames: Path) -> str:
    """``<class>/<video>`` of a ``Rename_Images/<class>/<video>`` folder."""
    return f"{frames.parent.name}/{frames.name}"
