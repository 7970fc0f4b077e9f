"""densevit-match: semantic point correspondences between two images (Amir et al. 2021).

    densevit-match A B --out DIR            (or a folder of pairs: one sub-folder with two images per pair)
    densevit-match A B --out DIR --points PTS.json     (also transfer these points of A to B)

Writes ``<a>_<b>_matches.png`` (the two images side by side, pair i marked and joined in colour i) and
``<a>_<b>_points.json`` (points in each image's original pixels, ``[x, y]``); with ``--points``, also
``<a>_<b>_transfer.png`` / ``.json`` (each given point of A and its nearest-neighbour position in B).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from densevit.runtime.progress import stage
from densevit.cli.common import build_source, run_cli
from densevit.cli.flags import config_from_args
from densevit.io.images import gather_sets
from densevit.errors import DensevitError
from densevit.io.files import atomic_write_text
from densevit.matching.geoaware import REFINE as GEOAWARE_REFINE
from densevit.matching.geoaware import GeoAwareOptions, flip_permutation
from densevit.matching.spair_tables import FLIP
from densevit.matching.transfer import REFINE
from densevit.options import opt

from .. import draw
from ..correspondence import (
    CorrespondenceConfig,
    find_correspondences_features,
    pair_features,
    transfer_keypoints_features,
    transfer_keypoints_geoaware,
)
from .common import check_sets_outputs, run_sets, sets_parser, stems, validated_config

PROG = "densevit-match"


@dataclass(frozen=True)
class TransferOptions:
    """Points of image A to carry over to image B."""

    points: Optional[str] = opt(None, "JSON file of points [[x, y], ...] (or {\"points\": [...]}) in image A's "
                                      "pixels to transfer to image B by nearest neighbour")
    refine: str = opt("none", "sub-token refinement of transferred points: softargmax (a window of --window "
                              "tokens around the match) or window-softargmax (GeoAware-SC's, on letterboxed square "
                              "canvases of --anno-size pixels; --window N gives a 2N + 1 window)",
                      choices=tuple(dict.fromkeys(REFINE + GEOAWARE_REFINE)))
    window: int = opt(5, "soft-argmax window: softargmax: side in tokens (odd); window-softargmax: half-side N")
    flip_table: Optional[str] = opt(None, "with --pose-align: the SPair category whose left/right keypoint twins "
                                          "swap in the mirrored image (point i = keypoint id i); none: no id swaps",
                                    choices=tuple(sorted(FLIP)))


def build_parser() -> argparse.ArgumentParser:
    return sets_parser(PROG, "Find semantic point correspondences between two images (best buddies of ViT "
                       "descriptors on salient regions, k-means pick).",
                       (CorrespondenceConfig, "correspondences (defaults: the reference's)"),
                       (TransferOptions, "point transfer"),
                       (GeoAwareOptions, "pose alignment of the point transfer (GeoAware-SC; docs/geoaware.md)"))


def read_points(path: str) -> np.ndarray:
    """Points ``Nx2`` from a JSON list of ``[x, y]`` (or an object with a ``points`` list)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DensevitError(f"cannot read points from {path}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("points")
    try:
        pts = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        pts = None
    if pts is None or pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise DensevitError(f"{path}: expected a JSON list of [x, y] points")
    return pts


def res_w(f) -> float:
    """Width of an image's original pixels (the x of its right edge), from its features' grid."""
    return float(f.grid.original_hw[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = validated_config(CorrespondenceConfig, args)
    query = read_points(args.points) if args.points else None
    geo = config_from_args(GeoAwareOptions, args)
    aligned = geo.pose_align != "none" or args.refine == "window-softargmax"
    if aligned and args.store:
        raise DensevitError("--pose-align and --refine window-softargmax run the model on letterboxed images; "
                            "they cannot read a --store")
    if aligned and query is None:
        raise DensevitError("--pose-align and --refine window-softargmax apply to --points")
    sets = gather_sets(args.inputs)
    check_sets_outputs(args, sets, [args.points])
    source = build_source(args, saliency=True)

    def prefix(images: List[Path]) -> str:
        a, b = stems(images)
        return f"{a}_{b}"

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        base = prefix(images)
        files = [out / f"{base}_matches.png", out / f"{base}_points.json"]
        if query is not None:
            files += [out / f"{base}_transfer.png", out / f"{base}_transfer.json"]
        return files

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        base = prefix(images)
        t = time.perf_counter()
        fa, fb = pair_features(source, images[0], images[1], cfg.load_size, cfg.layer, cfg.facet, cfg.bin, True)
        t_extract = time.perf_counter() - t
        res = find_correspondences_features(fa, fb, cfg)
        timings = {"extraction": t_extract, **res.timings}
        t = time.perf_counter()
        stage("drawing")
        pic = draw.correspondence_image(fa.image, fb.image, res.points_a, res.points_b)
        draw.save_rgb(out / f"{base}_matches.png", pic)
        record = {"image_a": str(images[0]), "image_b": str(images[1]),
                  "image_a_hw": list(res.image_hw_a), "image_b_hw": list(res.image_hw_b),
                  "points_a": res.points_a.round(3).tolist(), "points_b": res.points_b.round(3).tolist(),
                  "saliency": res.saliency.round(5).tolist(), "similarity": res.similarity.round(5).tolist(),
                  "num_buddies": res.num_buddies}
        atomic_write_text(out / f"{base}_points.json", json.dumps(record, indent=1) + "\n")
        line = f"{images[0].name} <-> {images[1].name}: {len(res.points_a)} pairs from {res.num_buddies} " \
               f"salient best buddies"
        if query is not None and aligned:
            al = transfer_keypoints_geoaware(source, images[0], images[1], query, geo, cfg.layer, cfg.facet, cfg.bin,
                                              args.refine if args.refine != "none" else "none", args.window,
                                              args.flip_table)
            pic_a, pts_a = fa.image, query
            if al.flipped:         # draw the orientation that was kept: the mirrored A, its points mirrored
                pic_a = draw.as_rgb(fa.image)[:, ::-1].copy()
                # keypoint i of the mirrored A is the mirror of its twin (the flip table's permutation)
                perm = flip_permutation(FLIP.get(args.flip_table, []) if args.flip_table else [], len(query))
                pts_a = np.stack([res_w(fa) - query[:, 0], query[:, 1]], axis=1)[perm.numpy()]
            pic = draw.correspondence_image(pic_a, fb.image, pts_a, al.points_b)
            label = ("A mirrored: pose alignment kept the flip" if al.flipped else "A as given: pose alignment kept "
                     "the original") if geo.pose_align != "none" else "no pose alignment"
            draw.save_rgb(out / f"{base}_transfer.png", draw.caption(pic, label))
            (out / f"{base}_transfer.json").write_text(json.dumps(
                {"image_a": str(images[0]), "image_b": str(images[1]), "points_a": query.round(3).tolist(),
                 "points_b": al.points_b.round(3).tolist(), "pose_align": geo.pose_align, "refine": args.refine,
                 "window": args.window, "anno_size": geo.anno_size, "flip_table": args.flip_table,
                 "masks": geo.masks, "flipped": al.flipped, "original_dist": al.original_dist,
                 "flip_dist": al.flip_dist}, indent=1) + "\n")
            line += f"; transferred {len(query)} points ({label})"
        elif query is not None:
            moved, sims = transfer_keypoints_features(fa, fb, query, refine=args.refine, window=args.window)
            draw.save_rgb(out / f"{base}_transfer.png", draw.correspondence_image(fa.image, fb.image, query, moved))
            atomic_write_text(out / f"{base}_transfer.json", json.dumps(
                {"image_a": str(images[0]), "image_b": str(images[1]), "points_a": query.round(3).tolist(),
                 "points_b": moved.round(3).tolist(), "similarity": sims.round(5).tolist()}, indent=1) + "\n")
            line += f"; transferred {len(query)} points"
        timings["drawing"] = time.perf_counter() - t
        return line, {"pairs": len(res.points_a), "num_buddies": res.num_buddies,
                      "timings": timings}

    return run_sets(PROG, args, sets, planned, process, min_images=2, max_images=2, more_inputs=[args.points],
                    source=source)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
