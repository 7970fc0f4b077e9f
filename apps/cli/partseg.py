"""densevit-partseg: part co-segmentation of sets of images (Amir et al. 2021).

    densevit-partseg IMAGES... | FOLDER | FOLDER_OF_SETS  --out DIR [--num-parts 4] [--three-stages]

Per image: ``<stem>_parts.png`` (original size, indexed PNG: 0 background, part i stored as i + 1, palette =
the overlay colours) and ``<stem>_overlay.png`` (parts in colour, background faded); per set ``summary.json``
and one summary line on stdout. The smoothing is a dense CRF when pydensecrf is installed (``--crf dense``),
otherwise its documented approximation (``--crf approx``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from densevit.cli.common import add_backbone_args, add_store_arg, build_source, gather_sets, run_cli
from densevit.errors import DensevitError

from .. import draw
from ..partseg import CRF_BACKENDS, PartsegConfig, crf_backend, part_cosegment
from .common import add_io_args, load_size_arg, run_sets, stems
from .coseg import add_coseg_args, check_saliency_source, kmeans_cap_arg

PROG = "densevit-partseg"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Co-segment the common object of each set of images "
                                "into parts consistent across the set (ViT descriptors, k-means, dense CRF).")
    add_io_args(p)
    d = PartsegConfig()
    add_coseg_args(p, d)
    g = p.add_argument_group("parts (defaults: the paper's)")
    g.add_argument("--num-parts", type=int, default=d.num_parts, help="number of parts")
    g.add_argument("--num-crop-augmentations", type=int, default=d.num_crop_augmentations,
                   help="random 95%% crops of each image and of its flip added to the clustering (helps small, "
                        "varied sets)")
    g.add_argument("--three-stages", action="store_true",
                   help="three clustering stages (foreground, common parts, parts): for sets with distractors")
    g.add_argument("--elbow-second-stage", type=float, default=d.elbow_second_stage,
                   help="elbow coefficient of the second stage (three stages only)")
    g.add_argument("--crf", choices=CRF_BACKENDS, default=d.crf,
                   help="smoothing: dense CRF (pydensecrf), its approximation, none; auto = dense if installed")
    g.add_argument("--crf-iters", type=int, default=d.crf_iters, help="mean-field iterations")
    add_backbone_args(p, stride=4, load_size=224, layer=11, facet="key")
    add_store_arg(p)
    return p


def config_from_args(args: argparse.Namespace) -> PartsegConfig:
    cfg = PartsegConfig(load_size=load_size_arg(args.load_size), layer=args.layer, facet=args.facet, bin=args.bin,
                        thresh=args.thresh, elbow=args.elbow, votes_percentage=args.votes_percentage,
                        sample_interval=args.sample_interval, num_parts=args.num_parts,
                        num_crop_augmentations=args.num_crop_augmentations, three_stages=args.three_stages,
                        elbow_second_stage=args.elbow_second_stage, crf=args.crf, crf_iters=args.crf_iters,
                        seed=args.seed, max_points_per_centroid=kmeans_cap_arg(args.max_points_per_centroid),
                        saliency_source=args.saliency_source, upsample_masks=args.upsample_masks)
    cfg.validate()
    crf_backend(cfg.crf)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    sets = gather_sets(args.inputs)
    if args.store and cfg.num_crop_augmentations:
        raise DensevitError("--num-crop-augmentations needs the model (crops of each image and of its flip are "
                            "not in a feature store); leave it out with --store")
    source = build_source(args, saliency=True)
    check_saliency_source(args)

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        return [out / f"{s}_{kind}.png" for s in stems(images) for kind in ("parts", "overlay")]

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        res = part_cosegment(source, images, cfg)
        t = time.perf_counter()
        coverage = []
        for stem, image, parts in zip(stems(images), res.images, res.parts):
            draw.save_labels(out / f"{stem}_parts.png", parts)
            draw.save_rgb(out / f"{stem}_overlay.png", draw.parts_overlay(image, parts, res.num_parts,
                                                                          max_side=args.max_side))
            coverage.append(np.bincount(parts.ravel() + 1, minlength=res.num_parts + 1)[1:] / parts.size)
        res.timings["drawing"] = time.perf_counter() - t
        line = (f"{len(images)} images, {res.num_parts} parts (k={res.k_fg} stage-1 clusters, salient "
                f"{res.salient.tolist()}), crf {res.crf}, part pixels "
                + " / ".join(f"{100 * c.sum():.1f}%" for c in coverage))
        summary = {"num_parts": res.num_parts, "k_stage1": res.k_fg, "salient_clusters": res.salient.tolist(),
                   "common_clusters": None if res.common is None else res.common.tolist(), "crf": res.crf,
                   "part_fraction": {n: [round(float(v), 5) for v in c] for n, c in zip(res.names, coverage)},
                   "timings": {k: round(v, 3) for k, v in res.timings.items()}}
        return line, summary

    return run_sets(PROG, args, sets, planned, process, min_images=2)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
