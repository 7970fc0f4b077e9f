"""DAVIS (2016 single-object, 2017 multi-object) in its official layout, and indexed-PNG mask I/O.

Layout::

    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...
    ROOT/ImageSets/2017/val.txt           one sequence name a line (also ImageSets/2016/val.txt in DAVIS-2017)
    ROOT/ImageSets/480p/val.txt           DAVIS-2016 release: "/JPEGImages/480p/<seq>/<f>.jpg /Annotations/..." lines

Ground truth as object ids: DAVIS-2017 masks are palette PNGs whose index is the object id (255 = void, read
as background, as the toolkit); DAVIS-2016 masks are 0/255 and read as one object (any nonzero value = id 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ...errors import DensevitError
from ...io.files import atomic_write
from ...io.images import open_image

PathLike = Union[str, Path]
VOID_ID = 255


def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS (= PASCAL VOC) colour map, ``n x 3`` uint8: index 0 black, 1 red, 2 green, 3 yellow, ..."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


DAVIS_PALETTE = davis_palette()


def read_mask(path: PathLike) -> np.ndarray:
    """Read a mask PNG as ids ``HxW`` uint8: palette index for 'P' images, the grey value for 'L'/'1'/16-bit
    images, and for RGB images the index of each colour in the DAVIS palette (grey RGB taken as grey)."""
    path = Path(path)
    if not path.is_file():
        raise DensevitError(f"no such mask file: {path}")
    with open_image(path) as img:          # the one reader: its size limit and one-line errors
        img.load()
        mode = img.mode
        arr = np.array(img)
    if mode == "P" or mode == "L":
        return arr.astype(np.uint8)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        if arr.min() < 0 or arr.max() > 255:
            raise DensevitError(f"mask {path} has values outside 0..255")
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3]
        if np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]):
            return rgb[..., 0].astype(np.uint8)
        return _colours_to_ids(rgb, path)
    if mode == "LA":
        return arr[..., 0].astype(np.uint8)
    raise DensevitError(f"unsupported mask image mode {mode!r} in {path}")


def _colours_to_ids(rgb: np.ndarray, path: Path) -> np.ndarray:
    """RGB mask -> DAVIS palette indices (every colour must be a palette colour)."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal = DAVIS_PALETTE.astype(np.int32)
    pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(c): i for i, c in reversed(list(enumerate(pal_code)))}
    colours, inverse = np.unique(code, return_inverse=True)
    missing = [int(c) for c in colours if int(c) not in lut]
    if missing:
        c = missing[0]
        raise DensevitError(f"mask {path} has colour ({c >> 16},{(c >> 8) & 255},{c & 255}) that is not in the "
                            f"DAVIS palette; save masks as palette or greyscale PNGs of object ids")
    ids = np.array([lut[int(c)] for c in colours], dtype=np.uint8)
    return ids[inverse.reshape(code.shape)]


def write_mask(path: PathLike, mask: np.ndarray, palette: np.ndarray = DAVIS_PALETTE) -> None:
    """Write ids ``HxW`` (0..255) as an indexed PNG with ``palette`` (default: DAVIS)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DensevitError(f"a mask must be HxW, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DensevitError("mask ids must lie in 0..255 to be written as an indexed PNG")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def labels_for_year(mask: np.ndarray, year: str) -> np.ndarray:
    """Raw mask values -> object ids as evaluated: 2016 any nonzero -> 1; 2017 void (255) -> 0."""
    mask = np.asarray(mask)
    if str(year) == "2016":
        return (mask > 0).astype(np.uint8)
    out = mask.astype(np.uint8, copy=True)
    out[out == VOID_ID] = 0
    return out


class DavisDataset:
    """Sequences of one DAVIS split.

    Args:
        root: folder holding ``JPEGImages``, ``Annotations`` and ``ImageSets``.
        year: ``"2016"`` (single object) or ``"2017"`` (multi-object).
        split: image-set name (``val``, ``train``, ``test-dev``...).
        resolution: ``"480p"`` or ``"Full-Resolution"``.
        sequences: subset of sequence names (default: all of the split).
    """

    def __init__(self, root: PathLike, year: str = "2017", split: str = "val", resolution: str = "480p",
                 sequences: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        self.year = str(year)
        self.split = split
        self.resolution = resolution
        if self.year not in ("2016", "2017"):
            raise DensevitError(f"DAVIS year must be 2016 or 2017, got {year!r}")
        if not self.root.is_dir():
            raise DensevitError(f"DAVIS root not found: {self.root}")
        self.img_dir = self.root / "JPEGImages" / resolution
        self.mask_dir = self.root / "Annotations" / resolution
        if not self.img_dir.is_dir():
            raise DensevitError(f"no JPEGImages/{resolution} folder under {self.root}")
        names = self._split_sequences()
        if sequences:
            unknown = [s for s in sequences if s not in names]
            if unknown:
                raise DensevitError(f"sequence(s) not in DAVIS {self.year} {split}: {', '.join(unknown)}")
            names = list(sequences)
        for s in names:
            if not (self.img_dir / s).is_dir():
                raise DensevitError(f"frames of sequence {s} not found in {self.img_dir}")
        self.sequences: List[str] = names

    def _split_sequences(self) -> List[str]:
        sets = self.root / "ImageSets"
        candidates = [sets / self.year / f"{self.split}.txt", sets / self.resolution / f"{self.split}.txt"]
        for path in candidates:
            if path.is_file():
                return _parse_imageset(path)
        raise DensevitError(f"no image set for DAVIS {self.year} {self.split}: looked for "
                            + " and ".join(str(p.relative_to(self.root)) for p in candidates))

    def __len__(self) -> int:
        return len(self.sequences)

    def frames(self, seq: str) -> List[Path]:
        """Sorted JPEG frames of ``seq``."""
        files = sorted((self.img_dir / seq).glob("*.jpg"))
        if not files:
            raise DensevitError(f"no frames for sequence {seq} in {self.img_dir / seq}")
        return files

    def mask_paths(self, seq: str) -> List[Path]:
        """Sorted annotation PNGs of ``seq`` (possibly only the first one, for test splits)."""
        return sorted((self.mask_dir / seq).glob("*.png"))

    def first_mask(self, seq: str) -> np.ndarray:
        """Object ids of the first annotated frame ``HxW`` uint8 (2016: 0/1; 2017: void -> 0)."""
        paths = self.mask_paths(seq)
        if not paths:
            raise DensevitError(f"no annotations for sequence {seq} in {self.mask_dir / seq}")
        return labels_for_year(read_mask(paths[0]), self.year)

    def ground_truth(self, seq: str) -> Tuple[np.ndarray, List[str]]:
        """All ground-truth ids ``FxHxW`` uint8 and the frame names (file stems), in frame order."""
        paths = self.mask_paths(seq)
        if not paths:
            raise DensevitError(f"no annotations for sequence {seq} in {self.mask_dir / seq}")
        masks = np.stack([labels_for_year(read_mask(p), self.year) for p in paths])
        return masks, [p.stem for p in paths]

    def num_objects(self, seq: str) -> int:
        """Number of objects: the largest id of the first annotation (as the toolkit)."""
        return int(self.first_mask(seq).max())


def _parse_imageset(path: Path) -> List[str]:
    """Sequence names of an image-set file, in order: plain names, or DAVIS-2016 'frame annotation' lines."""
    names: List[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        first = line.split()[0]
        name = Path(first).parent.name if "/" in first else first
        if name not in names:
            names.append(name)
    return names
