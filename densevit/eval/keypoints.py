"""Keypoint-transfer evaluation shared by the SPair-71k and warp benchmarks.

* :class:`ImageDescriber`: descriptors (``TxD``) and token grid of an image, computed once per image (an
  in-memory LRU, plus the on-disk :class:`densevit.storage.cache.DescriptorCache` when given a folder).
* :func:`evaluate_pair`: transfer a pair's source keypoints with :func:`densevit.matching.transfer.transfer_points`
  and keep a :class:`densevit.eval.metrics.pck.PairRecord`.
* :class:`ResultsLog`: a resumable output folder (``settings.json``, ``records.jsonl``, ``pck.csv``,
  ``pck.txt``); rerunning with the same settings skips the pairs already done.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ..errors import DensevitError
from ..io.files import atomic_write_text
from ..matching.transfer import transfer_points
from ..models.grid import TokenGrid
from ..runtime.device import synchronize
from ..io.files import file_fingerprint
from ..storage.cache import DescriptorCache
from .metrics.pck import ALPHAS, PairRecord, bbox_size, format_table, image_size, summarize, valid_points, write_csv

ImageSource = Union[str, Path, Image.Image, Callable[[], Union[str, Path, Image.Image]]]


def add_scoring_args(parser) -> None:
    """The transfer and PCK flags shared by the keypoint benchmarks (SPair-71k, warps)."""
    from ..matching.transfer import REFINE
    from .metrics.pck import THRESHOLDS

    e = parser.add_argument_group("transfer and scoring")
    from ..matching.geoaware import REFINE as GEOAWARE_REFINE

    e.add_argument("--refine", choices=tuple(dict.fromkeys(REFINE + GEOAWARE_REFINE)), default="none",
                   help="softargmax: soft-argmax over a window of tokens around the match (weights "
                        "softmax(cos / temperature), cells outside the grid left out); window-softargmax: "
                        "GeoAware-SC's (the similarity masked to a (2N+1)-square around the arg-max, softmax over "
                        "the whole grid at beta 0.02; on letterboxed square canvases, docs/geoaware.md)")
    e.add_argument("--window", type=int, default=5,
                   help="softargmax: window side in tokens (odd); window-softargmax: the reference's "
                        "SOFT_EVAL_WINDOW N (side 2N + 1; 0 = plain soft-argmax over the grid)")
    e.add_argument("--temperature", type=float, default=0.02, help="soft-argmax temperature (cosine units)")
    e.add_argument("--threshold", choices=THRESHOLDS, default="bbox",
                   help="PCK reference size: max side of the target object box (SPair standard) or of the image")
    e.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return e


def check_facet(facet: str) -> None:
    """Keypoint transfer needs per-token descriptors: every facet but ``attn``."""
    if facet == "attn":
        raise DensevitError("the attn facet is not a per-token descriptor; choose key, query, value, token "
                            "or token_norm")


class ImageDescriber:
    """Descriptors of one ``(layer, facet, bin)`` at one load size, once per image key.

    Args:
        extractor: a :class:`densevit.ViTExtractor`.
        cache_dir: folder of an on-disk descriptor cache (``densevit.storage.cache.DescriptorCache``), or None.
        keep: images kept in memory (LRU).
        identity: what else defines the descriptors (backbone, weights...), part of the disk-cache key, which
            also holds the image's file fingerprint (path, size, mtime) when the image is given as a path.
    """

    def __init__(self, extractor, load_size: int, layer: int, facet: str = "key", bin: bool = False,
                 cache_dir: Union[str, Path, None] = None, keep: int = 16,
                 identity: Optional[Mapping] = None) -> None:
        check_facet(facet)
        self.extractor, self.load_size, self.layer, self.facet, self.bin = extractor, load_size, layer, facet, bin
        self.keep = keep
        self._memory: "OrderedDict[str, Tuple[torch.Tensor, TokenGrid]]" = OrderedDict()
        self.identity = dict(identity or {})
        self.disk = None
        if cache_dir is not None:
            self.disk = DescriptorCache(cache_dir)
        self.seconds = 0.0   # time spent computing descriptors (not counting cache hits)
        self.computed = 0

    def _compute(self, image: Union[str, Path, Image.Image]) -> Dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        x, grid = self.extractor.preprocess(image, self.load_size)
        desc = self.extractor.extract_descriptors(x, layer=self.layer, facet=self.facet, bin=self.bin)[0]
        synchronize(desc.device)
        self.seconds += time.perf_counter() - t0
        self.computed += 1
        return {"desc": desc, "input_hw": torch.tensor(grid.input_hw), "image_hw": torch.tensor(grid.original_hw)}

    def __call__(self, key: str, image: ImageSource) -> Tuple[torch.Tensor, TokenGrid]:
        """``(descriptors TxD on the extractor's device, grid)`` of the image named ``key``."""
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        load = image if callable(image) else (lambda: image)
        if self.disk is not None:
            ident = file_fingerprint(image) if isinstance(image, (str, Path)) and Path(image).is_file() else key
            ckey = dict(self.identity, image=ident, load_size=self.load_size, layer=self.layer, facet=self.facet,
                        bin=self.bin, stride=self.extractor.stride, dtype=str(self.extractor.dtype))
            out = self.disk.get_or_compute(ckey, lambda: {k: v.cpu() for k, v in self._compute(load()).items()})
        else:
            out = self._compute(load())
        grid = self.extractor.grid(tuple(int(v) for v in out["input_hw"]), tuple(int(v) for v in out["image_hw"]))
        entry = (out["desc"].to(self.extractor.device), grid)
        self._memory[key] = entry
        while len(self._memory) > self.keep:
            self._memory.popitem(last=False)
        return entry


@dataclass
class EvalPair:
    """One pair to score: image keys + images (paths, PIL images or loaders), ``Nx2`` keypoints in original
    pixels (NaN or negative = missing), target box ``(x1, y1, x2, y2)`` (or None) and target ``(h, w)``."""

    name: str
    category: str
    src_key: str
    src_image: ImageSource
    trg_key: str
    trg_image: ImageSource
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    trg_bbox: Optional[Sequence[float]]
    trg_hw: Tuple[int, int]
    flags: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferSettings:
    refine: str = "none"
    window: int = 5
    temperature: float = 0.02


def evaluate_pair(describe: ImageDescriber, pair: EvalPair, transfer: TransferSettings = TransferSettings()
                  ) -> PairRecord:
    """Transfer the pair's valid source points to the target and record their distances to the truth."""
    t0 = time.perf_counter()
    desc_s, grid_s = describe(pair.src_key, pair.src_image)
    desc_t, grid_t = describe(pair.trg_key, pair.trg_image)
    src = torch.as_tensor(pair.src_kps, dtype=torch.float64).reshape(-1, 2)
    ok = valid_points(src, pair.trg_kps)
    pred = torch.full_like(src, float("nan"))
    if ok.any():
        pred[ok], _ = transfer_points(desc_s, desc_t, grid_s, grid_t, src[ok], refine=transfer.refine,
                                      window=transfer.window, temperature=transfer.temperature)
    seconds = time.perf_counter() - t0
    return PairRecord.from_prediction(
        pair.name, pair.category, pred, pair.trg_kps,
        None if pair.trg_bbox is None else bbox_size(pair.trg_bbox), image_size(pair.trg_hw), valid=ok,
        flags=pair.flags, seconds=seconds)


def run_info() -> dict:
    """Versions and machine, recorded beside the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> Optional[str]:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    from ..version import __version__

    info = {"densevit": __version__, "torch": torch.__version__, "timm": ver("timm"), "kornia": ver("kornia"),
            "faiss": ver("faiss-cpu") or ver("faiss-gpu"), "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "command": " ".join(sys.argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class ResultsLog:
    """A benchmark output folder that can be resumed.

    ``settings`` (JSON-serialisable) define the results: a folder holding results of other settings is refused
    unless ``overwrite`` (which deletes the old results). Keys in ``volatile`` (e.g. ``limit``, ``device``)
    may change between resumed runs.
    """

    FILES = ("settings.json", "records.jsonl", "pck.csv", "pck.txt")
    RANK_FILES = "records-rank*.jsonl"  # other ranks' records under torchrun, folded in by rank 0

    @classmethod
    def for_rank(cls, out_dir: Union[str, Path], rank: int) -> "ResultsLog":
        """The log of a rank other than 0 in a torchrun run: appends its records to ``records-rank<r>.jsonl``
        (rank 0 owns the settings and folds these files in with :meth:`merge_ranks`)."""
        log = cls.__new__(cls)
        log.dir, log.settings, log.volatile, log.records = Path(out_dir), {}, set(), {}
        log._log = open(log.dir / f"records-rank{rank}.jsonl", "a")
        return log

    def merge_ranks(self) -> None:
        """Fold the other ranks' record files into this log (rank 0, after they finished or died)."""
        for f in sorted(self.dir.glob(self.RANK_FILES)):
            for r in self._read_records(f):
                if r.name not in self.records:
                    self.add(r)
            f.unlink()

    @staticmethod
    def _read_records(path: Path) -> List[PairRecord]:
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(PairRecord.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interrupted run
        return out

    def __init__(self, out_dir: Union[str, Path], settings: Mapping, overwrite: bool = False,
                 volatile: Sequence[str] = ()) -> None:
        self.dir = Path(out_dir)
        self.settings = json.loads(json.dumps(dict(settings)))
        self.volatile = set(volatile)
        self.records: Dict[str, PairRecord] = {}
        settings_path = self.dir / "settings.json"
        if self.dir.exists() and not self.dir.is_dir():
            raise DensevitError(f"output {self.dir} exists and is not a folder")
        if overwrite:
            for f in self.FILES:
                (self.dir / f).unlink(missing_ok=True)
            for f in self.dir.glob(self.RANK_FILES):
                f.unlink()
        elif settings_path.is_file():
            old = json.loads(settings_path.read_text()).get("settings", {})
            diff = sorted(k for k in set(old) | set(self.settings)
                          if k not in self.volatile and old.get(k) != self.settings.get(k))
            if diff:
                raise DensevitError(f"{self.dir} holds results of other settings ({', '.join(diff)}); "
                                    "pass --overwrite or choose another output folder")
            self._load()
        elif self.dir.is_dir() and any((self.dir / f).exists() for f in self.FILES[1:]):
            raise DensevitError(f"{self.dir} holds results without settings.json; pass --overwrite")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_settings({})
        self._log = open(self.dir / "records.jsonl", "a")

    def _load(self) -> None:
        path = self.dir / "records.jsonl"
        rank_files = sorted(self.dir.glob(self.RANK_FILES))  # left by a distributed run that was cut short
        if not path.is_file() and not rank_files:
            return
        for f in ([path] if path.is_file() else []) + rank_files:
            for r in self._read_records(f):
                self.records.setdefault(r.name, r)
        # rewrite without cut lines so appends start on a fresh line
        atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in self.records.values()))
        for f in rank_files:
            f.unlink()

    def _write_settings(self, summary: Mapping) -> None:
        atomic_write_text(self.dir / "settings.json", json.dumps(
            {"settings": self.settings, "run": run_info(), "summary": dict(summary)}, indent=2) + "\n")

    def done(self, name: str) -> bool:
        return name in self.records

    def add(self, record: PairRecord) -> None:
        self.records[record.name] = record
        self._log.write(json.dumps(record.to_json()) + "\n")
        self._log.flush()

    def finish(self, names: Sequence[str], alphas: Sequence[float] = ALPHAS, threshold: str = "bbox",
               breakdown: Sequence[str] = (), title: str = "", extra: Optional[Mapping] = None) -> str:
        """Summarise the records of ``names`` into ``pck.csv`` / ``pck.txt`` / the settings' summary; returns
        the table text."""
        self._log.close()
        recs = [self.records[n] for n in names if n in self.records]
        rows = summarize(recs, alphas, threshold, breakdown)
        geo_cols = None
        if any("pck_img" in r.extra for r in recs):      # the GeoAware-SC protocol's per-image scores
            from .geoaware import format_geoaware, summarize_geoaware

            geo_cols = summarize_geoaware([{"category": r.category, **r.extra} for r in recs])
        write_csv(rows, self.dir / "pck.csv", alphas, geo_cols)
        secs = [r.seconds for r in recs if r.seconds is not None]
        summary = {"pairs": len(recs), "threshold": threshold, "alphas": list(alphas),
                   "seconds_per_pair": (sum(secs) / len(secs)) if secs else None, **dict(extra or {})}
        for r in rows:
            if r.group == "all":
                summary["all"] = {"n_pairs": r.n_pairs, "n_points": r.n_points,
                                  "per_point": {f"{a:g}": r.per_point[a] for a in alphas},
                                  "per_image": {f"{a:g}": r.per_image[a] for a in alphas}}
        self._write_settings(summary)
        table = format_table(rows, alphas, title)
        if geo_cols:
            table += "\n" + format_geoaware(geo_cols)
            summary["geoaware"] = geo_cols
            self._write_settings(summary)
        atomic_write_text(self.dir / "pck.txt", table + "\n")
        return table
