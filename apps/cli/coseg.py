"""densevit-coseg: co-segment sets of images (Amir et al. 2021).

    densevit-coseg IMAGES... | FOLDER | FOLDER_OF_SETS  --out DIR [--overwrite]

Per image: ``<stem>_mask.png`` (original size, 0/255) and ``<stem>_overlay.png`` (background faded to a
checkerboard, outline in red); per set ``summary.json``, and one summary line on stdout.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from densevit.runtime.progress import track
from densevit.cli.common import run_cli
from densevit.features.upsampled import UpsampleOptions

from .. import draw

from ..coseg import CosegConfig, cosegment
from .common import clustering_inputs, planned_pictures, run_sets, sets_parser, stems, timed, validated_config

PROG = "densevit-coseg"


def build_parser() -> argparse.ArgumentParser:
    return sets_parser(PROG, "Co-segment the common foreground object of each set of images (ViT descriptors: "
                       "k-means, saliency voting, GrabCut).", (CosegConfig, "co-segmentation (defaults: the "
                                                                             "reference's)"),
                       (UpsampleOptions, "pixel-dense features"))


def config_from_args(args: argparse.Namespace) -> CosegConfig:
    return validated_config(CosegConfig, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    sets, source = clustering_inputs(args, cls=cfg.remove_outliers)
    planned = planned_pictures("mask", "overlay")

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        res = cosegment(source, images, cfg)
        fractions = [float(mask.mean()) for mask in res.masks]
        with timed(res.timings, "drawing"):
            for stem, image, mask in track(list(zip(stems(images), res.images, res.masks)), "drawing"):
                draw.save_mask(out / f"{stem}_mask.png", mask)
                draw.save_rgb(out / f"{stem}_overlay.png", draw.mask_overlay(image, mask, max_side=args.max_side))
        outliers = [n for n, keep in zip(res.names, res.inliers) if not keep]
        line = (f"{len(images)} images, k={res.k} clusters, salient {res.salient.tolist()}, foreground "
                + " / ".join(f"{100 * f:.1f}%" for f in fractions)
                + (f", outliers: {', '.join(outliers)}" if outliers else ""))
        summary = {"k": res.k, "salient_clusters": res.salient.tolist(), "votes": res.votes.tolist(),
                   "foreground_fraction": dict(zip(res.names, fractions)),
                   "inliers": dict(zip(res.names, map(bool, res.inliers))),
                   "grabcut_applied": dict(zip(res.names, res.grabcut_applied)),
                   "timings": res.timings}
        return line, summary

    return run_sets(PROG, args, sets, planned, process, source=source)          # at least two images a set


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
