"""Reader (and writer) of the official SPair-71k release layout.

::

    <root>/JPEGImages/<category>/<image>.jpg
    <root>/ImageAnnotation/<category>/<image>.json
    <root>/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    <root>/Layout/{large,small}/{trn,val,test}.txt        (one pair name per line, without ".json")
    <root>/Segmentation/<category>/<image>.png            (not used here)

Conventions of the release, kept as is: ``*_imsize`` is ``[width, height, depth]``; boxes are
``[x1, y1, x2, y2]`` in pixels; keypoints ``[x, y]`` in pixels of the original image; a pair lists only the
keypoints visible in both images (``kps_ids`` gives their ids, as strings); an image annotation maps every
keypoint id of its category to ``[x, y]`` or ``null`` (invisible). Difficulty flags of a pair:
``viewpoint_variation`` and ``scale_variation`` (0 easy, 1 medium, 2 hard), ``truncation`` and ``occlusion``
(0 none, 1 source, 2 target, 3 both), ``mirror`` (0/1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ...errors import DensevitError
from ...io.files import atomic_write_text

CATEGORIES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
SPLITS: Tuple[str, ...] = ("trn", "val", "test")
_SPLIT_ALIASES = {"train": "trn", "training": "trn", "validation": "val"}
PAIR_FLAGS: Tuple[str, ...] = ("mirror", "viewpoint_variation", "scale_variation", "truncation", "occlusion")
# Key order of the released pair annotation files (the writer reproduces it).
PAIR_KEYS: Tuple[str, ...] = (
    "pair_id", "filename", "src_imname", "trg_imname", "src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox",
    "category", "src_pose", "trg_pose", "src_kps", "trg_kps", "kps_ids", "mirror", "viewpoint_variation",
    "scale_variation", "truncation", "occlusion")


def _kps_tensor(kps: Sequence) -> torch.Tensor:
    return torch.tensor([[float(v) for v in p] for p in kps], dtype=torch.float64).reshape(-1, 2)


@dataclass(frozen=True)
class SPairPair:
    """One pair annotation. Keypoints ``Nx2 (x, y)`` float64 in original-image pixels (row ``k`` of source and
    target is keypoint ``kps_ids[k]``); boxes ``(x1, y1, x2, y2)``; ``*_hw`` = (height, width)."""

    name: str
    split: str
    pair_id: int
    category: str
    src_imname: str
    trg_imname: str
    src_hw: Tuple[int, int]
    trg_hw: Tuple[int, int]
    src_bndbox: Tuple[float, float, float, float]
    trg_bndbox: Tuple[float, float, float, float]
    src_pose: str
    trg_pose: str
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    kps_ids: Tuple[str, ...]
    flags: Dict[str, int]
    raw: Dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.src_kps.shape[0])


@dataclass(frozen=True)
class SPairImage:
    """One image annotation: ``kps`` is ``Kx2`` over the category's keypoint ids ``0..K-1`` (NaN = invisible)."""

    filename: str
    category: str
    hw: Tuple[int, int]
    bndbox: Tuple[float, float, float, float]
    pose: str
    truncated: int
    occluded: int
    difficult: int
    kps: torch.Tensor
    azimuth_id: Optional[int]
    raw: Dict = field(repr=False, compare=False, default_factory=dict)


def normalize_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise DensevitError(f"unknown SPair split {split!r}; choose from {', '.join(SPLITS)}")
    return s


def parse_pair_name(name: str) -> Tuple[int, str, str, str]:
    """``"000001-2008_002719-2008_004100:aeroplane"`` -> ``(1, "2008_002719", "2008_004100", "aeroplane")``."""
    stem, sep, category = name.rpartition(":")
    parts = stem.split("-")
    if not sep or len(parts) != 3 or not parts[0].isdigit():
        raise DensevitError(f"not an SPair pair name (<id>-<src>-<trg>:<category>): {name!r}")
    return int(parts[0]), parts[1], parts[2], category


def parse_pair(data: Dict, name: str, split: str) -> SPairPair:
    """Parse one pair annotation (the decoded JSON of ``PairAnnotation/<split>/<name>.json``)."""
    try:
        src_kps, trg_kps = _kps_tensor(data["src_kps"]), _kps_tensor(data["trg_kps"])
        kps_ids = tuple(str(k) for k in data["kps_ids"])
        if src_kps.shape != trg_kps.shape or len(kps_ids) != src_kps.shape[0]:
            raise DensevitError(f"SPair pair {name}: {src_kps.shape[0]} source, {trg_kps.shape[0]} target keypoints "
                                f"and {len(kps_ids)} ids")
        sw, sh = int(data["src_imsize"][0]), int(data["src_imsize"][1])
        tw, th = int(data["trg_imsize"][0]), int(data["trg_imsize"][1])
        return SPairPair(
            name=name, split=split, pair_id=int(data["pair_id"]), category=str(data["category"]),
            src_imname=str(data["src_imname"]), trg_imname=str(data["trg_imname"]),
            src_hw=(sh, sw), trg_hw=(th, tw),
            src_bndbox=tuple(float(v) for v in data["src_bndbox"]),
            trg_bndbox=tuple(float(v) for v in data["trg_bndbox"]),
            src_pose=str(data.get("src_pose", "")), trg_pose=str(data.get("trg_pose", "")),
            src_kps=src_kps, trg_kps=trg_kps, kps_ids=kps_ids,
            flags={k: int(data[k]) for k in PAIR_FLAGS if k in data}, raw=dict(data))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DensevitError(f"malformed SPair pair annotation {name}: {type(exc).__name__}: {exc}") from exc


def parse_image(data: Dict) -> SPairImage:
    """Parse one image annotation (the decoded JSON of ``ImageAnnotation/<category>/<image>.json``)."""
    try:
        kps_map = data["kps"]
        ids = sorted(kps_map, key=int)
        kps = torch.full((len(ids), 2), float("nan"), dtype=torch.float64)
        for i, k in enumerate(ids):
            if int(k) != i:
                raise ValueError(f"keypoint ids are not 0..{len(ids) - 1}")
            if kps_map[k] is not None:
                kps[i] = torch.tensor([float(v) for v in kps_map[k]], dtype=torch.float64)
        return SPairImage(
            filename=str(data["filename"]), category=str(data["category"]),
            hw=(int(data["image_height"]), int(data["image_width"])),
            bndbox=tuple(float(v) for v in data["bndbox"]), pose=str(data.get("pose", "")),
            truncated=int(data.get("truncated", 0)), occluded=int(data.get("occluded", 0)),
            difficult=int(data.get("difficult", 0)), kps=kps,
            azimuth_id=None if data.get("azimuth_id") is None else int(data["azimuth_id"]), raw=dict(data))
    except (KeyError, TypeError, ValueError) as exc:
        raise DensevitError(f"malformed SPair image annotation {data.get('filename', '?')}: {exc}") from exc


def write_annotation(path: Union[str, Path], data: Dict) -> None:
    """Write an annotation dict as the release does: ``json.dumps`` defaults plus a final newline."""
    atomic_write_text(path, json.dumps(data) + "\n")


def _read_json(path: Path) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DensevitError(f"missing SPair annotation file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DensevitError(f"cannot parse {path}: {exc}") from exc


class SPair:
    """Pairs of one split of an SPair-71k tree, in the order of ``Layout/<layout>/<split>.txt`` (or sorted
    pair files when the layout list is absent), optionally restricted to some categories and the first
    ``limit`` pairs. Pairs are parsed on access."""

    def __init__(self, root: Union[str, Path], split: str = "test", layout: str = "large",
                 categories: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> None:
        self.root = Path(root)
        self.split = normalize_split(split)
        self.layout = layout
        ann_dir = self.root / "PairAnnotation" / self.split
        if not ann_dir.is_dir():
            raise DensevitError(f"{self.root} is not an SPair-71k tree: no folder PairAnnotation/{self.split}")
        self.categories = tuple(categories) if categories else None
        names = self._pair_names(ann_dir)
        if self.categories:
            known = {parse_pair_name(n)[3] for n in names}
            unknown = [c for c in self.categories if c not in known]
            if unknown:
                raise DensevitError(f"no SPair {self.split} pairs of categor{'y' if len(unknown) == 1 else 'ies'} "
                                    f"{', '.join(unknown)} (available: {', '.join(sorted(known))})")
            names = [n for n in names if parse_pair_name(n)[3] in self.categories]
        if limit is not None:
            if limit < 0:
                raise DensevitError(f"--limit must be >= 0, got {limit}")
            names = names[:limit]
        self.names: List[str] = names

    def _pair_names(self, ann_dir: Path) -> List[str]:
        listing = self.root / "Layout" / self.layout / f"{self.split}.txt"
        if listing.is_file():
            names = [l.strip() for l in listing.read_text().splitlines() if l.strip()]
            for n in names:
                parse_pair_name(n)
        else:
            names = sorted(p.stem for p in ann_dir.glob("*.json"))
        if not names:
            raise DensevitError(f"no SPair pairs in {listing if listing.is_file() else ann_dir}")
        return names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> SPairPair:
        return self.pair(self.names[i])

    def __iter__(self) -> Iterator[SPairPair]:
        return (self.pair(n) for n in self.names)

    def pair(self, name: str) -> SPairPair:
        """Parse the pair annotation ``name`` (without ``.json``)."""
        return parse_pair(_read_json(self.root / "PairAnnotation" / self.split / f"{name}.json"), name, self.split)

    def image_path(self, category: str, imname: str) -> Path:
        return self.root / "JPEGImages" / category / imname

    def image_annotation(self, category: str, imname: str) -> SPairImage:
        """Parse ``ImageAnnotation/<category>/<image>.json`` (``imname`` with or without ``.jpg``)."""
        return parse_image(_read_json(self.root / "ImageAnnotation" / category / f"{Path(imname).stem}.json"))


def pair_json(pair_id: int, src_imname: str, trg_imname: str, category: str,
              src_imsize: Sequence[int], trg_imsize: Sequence[int],
              src_bndbox: Sequence[int], trg_bndbox: Sequence[int],
              src_kps: Sequence[Sequence[int]], trg_kps: Sequence[Sequence[int]], kps_ids: Sequence,
              src_pose: str = "Frontal", trg_pose: str = "Frontal", mirror: int = 0, viewpoint_variation: int = 0,
              scale_variation: int = 0, truncation: int = 0, occlusion: int = 0) -> Dict:
    """A pair annotation dict in the released key order and types (``imsize`` = ``[w, h, 3]``; ints)."""
    filename = f"{pair_id:06d}-{Path(src_imname).stem}-{Path(trg_imname).stem}:{category}"
    values = dict(pair_id=int(pair_id), filename=filename, src_imname=src_imname, trg_imname=trg_imname,
                  src_imsize=[int(v) for v in src_imsize], trg_imsize=[int(v) for v in trg_imsize],
                  src_bndbox=[int(v) for v in src_bndbox], trg_bndbox=[int(v) for v in trg_bndbox],
                  category=category, src_pose=src_pose, trg_pose=trg_pose,
                  src_kps=[[int(v) for v in p] for p in src_kps], trg_kps=[[int(v) for v in p] for p in trg_kps],
                  kps_ids=[str(k) for k in kps_ids], mirror=int(mirror), viewpoint_variation=int(viewpoint_variation),
                  scale_variation=int(scale_variation), truncation=int(truncation), occlusion=int(occlusion))
    return {k: values[k] for k in PAIR_KEYS}


def image_json(filename: str, category: str, image_hw: Sequence[int], bndbox: Sequence[int],
               kps: Sequence[Optional[Sequence[int]]], pose: str = "Frontal", truncated: int = 0, occluded: int = 0,
               difficult: int = 0, azimuth_id: int = 0, src_database: str = "", src_annotation: str = "",
               src_image: str = "") -> Dict:
    """An image annotation dict in the released key order (``kps``: one ``[x, y]`` or None per keypoint id)."""
    return {"filename": filename, "src_database": src_database, "src_annotation": src_annotation,
            "src_image": src_image, "image_width": int(image_hw[1]), "image_height": int(image_hw[0]),
            "image_depth": 3, "category": category, "pose": pose, "truncated": int(truncated),
            "occluded": int(occluded), "difficult": int(difficult), "bndbox": [int(v) for v in bndbox],
            "kps": {str(i): (None if p is None else [int(v) for v in p]) for i, p in enumerate(kps)},
            "azimuth_id": int(azimuth_id)}
