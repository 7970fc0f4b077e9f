"""GeoAware-SC's zero-shot SPair-71k protocol (Zhang et al., CVPR 2024; github Junyi42/GeoAware-SC, commit
99fd6b6, ``pck_train.py --config configs/eval_zero_shot_spair.yaml``, DINOv2 part only), pair by pair.

Per pair: both images letterboxed to ``load_size`` (840: a 60 x 60 grid of DINOv2 ViT-B/14), descriptors of one
``(layer, facet)`` (block 11 output, no final norm), L2-normalised; keypoints on an ``anno_size`` canvas (840);
transfer by nearest neighbour or window soft-argmax; optionally *pose alignment*: the mirrored source (its
descriptors from the mirrored image) is matched too, keypoint ids permuted by the category's flip table, and the
orientation whose descriptors agree better with the target (object masks, or mutual nearest neighbours) is
kept. Scores as the reference: per-image PCK@0.1/0.05/0.01 (error ``<`` alpha x max side of the target box, in
canvas pixels) over the mutually visible keypoints, and the geometry-aware subset (members of a
:data:`~densevit.matching.spair_tables.GEO_AWARE` group that are mutually visible, when >= 2 members of the group
are visible in the target).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DensevitError
from ..features.canvas import canvas_descriptors, read_object_mask
from ..io.letterbox import Letterbox, letterbox_geometry
from ..matching.geoaware import POSE_ALIGN, REFINE, align_and_transfer, compact_table
from ..matching.spair_tables import FLIP, GEO_AWARE
from ..runtime.device import synchronize
from ..storage.cache import DescriptorCache

ALPHAS_IMG: Tuple[float, ...] = (0.1, 0.05, 0.01)
MASK_SOURCES = ("file", "saliency")


@dataclass(frozen=True)
class GeoAwareSettings:
    """The protocol's settings; the defaults are the reference's zero-shot configuration."""

    pose_align: str = "flip-mask"
    refine: str = "window-softargmax"
    window: int = 5
    beta: float = 0.02
    anno_size: int = 840
    load_size: int = 840
    layer: int = 11
    facet: str = "token"
    bin: bool = False
    masks: str = "file"                 # "file" (masks_dir) or "saliency" (densevit's CLS-attention saliency)
    masks_dir: Optional[str] = None

    def check(self) -> None:
        if self.pose_align not in POSE_ALIGN:
            raise DensevitError(f"unknown --pose-align {self.pose_align!r}; choose from {', '.join(POSE_ALIGN)}")
        if self.refine not in REFINE:
            raise DensevitError(f"unknown refinement {self.refine!r} for the GeoAware protocol; choose from "
                                f"{', '.join(REFINE)}")
        if self.window < 0:
            raise DensevitError(f"--window must be >= 0 (0 = plain soft-argmax), got {self.window}")
        if self.anno_size < 1 or self.load_size < 1:
            raise DensevitError("--anno-size and --load-size must be positive")
        if self.pose_align == "flip-mask":
            if self.masks not in MASK_SOURCES:
                raise DensevitError(f"unknown mask source {self.masks!r}; choose from {', '.join(MASK_SOURCES)}")
            if self.masks == "file" and not self.masks_dir:
                raise DensevitError("--pose-align flip-mask needs object masks: --masks DIR (files "
                                    "<DIR>/<category>/<image>_mask.png) or --masks saliency")

    def describe_masks(self) -> str:
        if self.pose_align != "flip-mask":
            return "none"
        return f"files in {self.masks_dir}" if self.masks == "file" else "densevit saliency (CLS attention)"


class CanvasDescriber:
    """Descriptors (``TxD``, L2-normalised) and object mask of letterboxed images, mirrored or not, once per
    ``(key, flipped)`` (an in-memory LRU)."""

    def __init__(self, extractor, settings: GeoAwareSettings, keep: int = 8,
                 cache_dir: Union[str, Path, None] = None, identity: Optional[Mapping] = None) -> None:
        self.extractor, self.settings, self.keep = extractor, settings, keep
        self._memory: "OrderedDict[Tuple[str, bool], Tuple[torch.Tensor, Optional[torch.Tensor]]]" = OrderedDict()
        self.seconds, self.computed = 0.0, 0
        self.disk = DescriptorCache(cache_dir) if cache_dir is not None else None
        self.identity = dict(identity or {})

    def __call__(self, key: str, image: Callable[[], Image.Image], flipped: bool = False
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hit = self._memory.get((key, flipped))
        if hit is not None:
            self._memory.move_to_end((key, flipped))
            return hit
        if self.disk is not None:
            st = self.settings
            ckey = dict(self.identity, protocol="geoaware-canvas", image=key, flipped=flipped, load_size=st.load_size,
                        layer=st.layer, facet=st.facet, saliency=self._want_saliency(),
                        stride=self.extractor.stride, dtype=str(self.extractor.dtype))
            out = self.disk.get_or_compute(ckey, lambda: {k: v for k, v in zip(
                ("desc", "mask"), self._compute(image, flipped)) if v is not None})
            entry = (out["desc"].to(self.extractor.device), out.get("mask"))
        else:
            entry = self._compute(image, flipped)
        self._memory[(key, flipped)] = entry
        while len(self._memory) > self.keep:
            self._memory.popitem(last=False)
        return entry

    def _want_saliency(self) -> bool:
        return self.settings.pose_align == "flip-mask" and self.settings.masks == "saliency"

    def _compute(self, image: Callable[[], Image.Image], flipped: bool
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t0 = time.perf_counter()
        st = self.settings
        desc, mask = canvas_descriptors(self.extractor, image(), st.load_size, st.layer, st.facet, bin=st.bin,
                                        flipped=flipped, saliency=self._want_saliency())
        synchronize(desc.device)
        self.seconds += time.perf_counter() - t0
        self.computed += 1
        return desc, mask


@dataclass
class GeoAwareImage:
    """One image of a pair: key, loader, category, annotation keypoints ``Kx2`` (original pixels, NaN =
    invisible) over the category's ids, ``(w, h)``, and where its mask files are (stem)."""

    key: str
    load: Callable[[], Image.Image]
    category: str
    kps: torch.Tensor
    wh: Tuple[int, int]
    stem: str


@dataclass
class GeoAwareResult:
    """What the protocol records for one pair (canvas = ``anno_size`` pixels)."""

    pred_canvas: torch.Tensor         # K x 2 predictions for the used ids (canvas pixels)
    flipped: bool
    original_dist: Optional[float]
    flip_dist: Optional[float]
    pck_img: Optional[List[float]]    # at ALPHAS_IMG, None without mutually visible keypoints
    pck_img_geo: Optional[List[float]]
    n_geo: int
    seconds: float


def _canvas_kps(img: GeoAwareImage, used: Sequence[int], anno: int) -> Tuple[torch.Tensor, torch.Tensor, Letterbox]:
    geo = letterbox_geometry(img.wh, anno)
    k = img.kps[list(used)] if len(used) else img.kps[:0]
    vis = torch.isfinite(k).all(dim=1)
    pts = geo.to_canvas(torch.where(vis[:, None], k, torch.zeros_like(k)))
    pts[~vis] = 0.0
    return pts, vis, geo


def geo_aware_ids(category: str, vis_mutual: torch.Tensor, vis_target: torch.Tensor) -> List[int]:
    """Keypoint ids of the geometry-aware subset of a pair (the reference's rule, over SPair ids): members of a
    :data:`GEO_AWARE` group that are mutually visible, for the groups with >= 2 members visible in the target
    and >= 1 mutually visible. A category without a table has none."""
    out: List[int] = []
    n = len(vis_mutual)
    for g in GEO_AWARE.get(category, []):
        g = [g] if isinstance(g, int) else list(g)
        both = [i for i in g if i < n and bool(vis_mutual[i])]
        trg = [i for i in g if i < n and bool(vis_target[i])]
        if len(trg) >= 2 and len(both) >= 1:
            out.extend(both)
    return out


def _masks(settings: GeoAwareSettings, img: GeoAwareImage, saliency: Optional[torch.Tensor], flipped: bool
           ) -> torch.Tensor:
    if settings.masks == "saliency":
        if saliency is None:
            raise DensevitError("no saliency mask computed")
        return saliency
    base = Path(settings.masks_dir) / img.category / img.stem
    return read_object_mask(base, flipped, "--pose-align flip-mask reads <DIR>/<category>/<image>_mask.png")


def evaluate_geoaware(describe: CanvasDescriber, src: GeoAwareImage, trg: GeoAwareImage, used: Sequence[int],
                      trg_bbox: Sequence[float], settings: GeoAwareSettings) -> GeoAwareResult:
    """Transfer the source keypoints of the used ids to the target and score them, as the reference does."""
    t0 = time.perf_counter()
    anno = settings.anno_size
    used = list(used)
    src_c, vis_s, _ = _canvas_kps(src, used, anno)
    trg_c, vis_t, geo_t = _canvas_kps(trg, used, anno)
    vis = vis_s & vis_t
    desc_s, sal_s = describe(src.key, src.load)
    desc_t, sal_t = describe(trg.key, trg.load)
    desc_f = masks = None
    table = compact_table(FLIP.get(src.category, []), used)
    if settings.pose_align != "none":
        desc_f, sal_f = describe(src.key, src.load, flipped=True)
        if settings.pose_align == "flip-mask":
            masks = (_masks(settings, src, sal_s, False), _masks(settings, src, sal_f, True),
                     _masks(settings, trg, sal_t, False))
    pred, flipped, d0, d1 = align_and_transfer(desc_s, desc_f, desc_t, src_c, vis, table, anno, settings.pose_align,
                                               settings.refine, settings.window, settings.beta, masks)
    # scores, in canvas pixels, as compute_pck (per image) and get_img_result (geo-aware subset) compute them
    x1, y1, x2, y2 = (float(v) for v in trg_bbox)
    thr = max(y2 - y1, x2 - x1) * geo_t.scale
    alpha = torch.tensor(ALPHAS_IMG, dtype=torch.float32)
    pck_img = None
    if vis.any():
        err = (trg_c[vis] - pred[vis]).norm(dim=-1)
        pck_img = (err[None, :] < (alpha.double() * thr)[:, None]).double().mean(dim=1).tolist()
    full_vis_t = torch.zeros(max(used, default=-1) + 1, dtype=torch.bool)
    full_vis = full_vis_t.clone()
    full_vis_t[used] = vis_t
    full_vis[used] = vis
    geo_ids = geo_aware_ids(src.category, full_vis, full_vis_t)
    pck_geo = None
    if geo_ids:
        rows = [used.index(i) for i in geo_ids]
        err = (trg_c[rows] - pred[rows]).norm(dim=-1)
        thr32 = alpha * torch.tensor(thr, dtype=torch.float32)
        pck_geo = (err[None, :] < thr32[:, None]).float().mean(dim=1).double().tolist()
    return GeoAwareResult(pred, flipped, d0, d1, pck_img, pck_geo, len(geo_ids), time.perf_counter() - t0)


def used_ids(images_kps: Sequence[torch.Tensor]) -> List[int]:
    """The keypoint ids visible in at least one of the images (the reference's ``used_points`` of a category)."""
    if not images_kps:
        return []
    n = max(k.shape[0] for k in images_kps)
    seen = torch.zeros(n, dtype=torch.bool)
    for k in images_kps:
        seen[: k.shape[0]] |= torch.isfinite(k).all(dim=1)
    return [i for i in range(n) if seen[i]]


def summarize_geoaware(records: Sequence[Mapping]) -> Dict[str, Dict[str, float]]:
    """Per category and ``all``: the means over pairs of ``pck_img`` (pairs with mutually visible keypoints) and
    of ``pck_img_geo`` (pairs with a geometry-aware subset), as columns ``pck_img@a`` and ``pck_img_geo@0.1``."""
    groups: Dict[str, List[Mapping]] = {}
    for r in records:
        if r.get("pck_img") is None and r.get("pck_img_geo") is None and "flipped" not in r:
            continue
        groups.setdefault(r["category"], []).append(r)
        groups.setdefault("all", []).append(r)
    out: Dict[str, Dict[str, float]] = {}
    for g, recs in groups.items():
        img = [r["pck_img"] for r in recs if r.get("pck_img") is not None]
        geo = [r["pck_img_geo"] for r in recs if r.get("pck_img_geo") is not None]
        row = {f"pck_img@{a:g}": (float(np.mean([v[i] for v in img])) if img else float("nan"))
               for i, a in enumerate(ALPHAS_IMG)}
        row["pck_img_geo@0.1"] = float(np.mean([v[0] for v in geo])) if geo else float("nan")
        out[g] = row
    return out


def settings_dict(settings: GeoAwareSettings) -> dict:
    return asdict(settings)


def format_geoaware(cols: Mapping[str, Mapping[str, float]]) -> str:
    """The reference's figures as a small text table (percent): per category, then ``all``."""
    names = [g for g in sorted(cols) if g != "all"] + (["all"] if "all" in cols else [])
    head = ["group", "img@0.1", "img@0.05", "img@0.01", "geo@0.1"]
    keys = ["pck_img@0.1", "pck_img@0.05", "pck_img@0.01", "pck_img_geo@0.1"]
    lines = [[g] + [f"{100 * cols[g][k]:.2f}" for k in keys] for g in names]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(["GeoAware-SC per-image PCK (error < alpha x box side; geo = geometry-aware subset)",
                      fmt(head), "-" * len(fmt(head))] + [fmt(l) for l in lines])
