"""densevit-coseg: co-segment sets of images (Amir et al. 2021).

    densevit-coseg IMAGES... | FOLDER | FOLDER_OF_SETS  --out DIR [--overwrite]

Per image: ``<stem>_mask.png`` (original size, 0/255) and ``<stem>_overlay.png`` (background faded to a
checkerboard, outline in red); per set ``summary.json``, and one summary line on stdout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from densevit.cli.common import build_source, gather_sets, run_cli
from densevit.errors import DensevitError

from .. import draw
from ..coseg import CosegConfig, cosegment
from .common import run_sets, sets_parser, stems, validated_config

PROG = "densevit-coseg"


def check_saliency_source(args: argparse.Namespace) -> None:
    """The reference's saliency needs a second pass of the model, which a feature store cannot give."""
    if getattr(args, "store", None) and args.saliency_source == "reference":
        raise DensevitError("--store holds the saliency of its own pass only: add --saliency-source same-pass "
                            "(the reference's low-resolution saliency needs the model)")


def build_parser() -> argparse.ArgumentParser:
    return sets_parser(PROG, "Co-segment the common foreground object of each set of images (ViT descriptors: "
                       "k-means, saliency voting, GrabCut).", (CosegConfig, "co-segmentation (defaults: the "
                                                                             "reference's)"))


def config_from_args(args: argparse.Namespace) -> CosegConfig:
    return validated_config(CosegConfig, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    sets = gather_sets(args.inputs)
    source = build_source(args, saliency=True, cls=cfg.remove_outliers)
    check_saliency_source(args)

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        return [out / f"{s}_{kind}.png" for s in stems(images) for kind in ("mask", "overlay")]

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        res = cosegment(source, images, cfg)
        t = time.perf_counter()
        fractions = []
        for stem, image, mask in zip(stems(images), res.images, res.masks):
            draw.save_mask(out / f"{stem}_mask.png", mask)
            draw.save_rgb(out / f"{stem}_overlay.png", draw.mask_overlay(image, mask, max_side=args.max_side))
            fractions.append(float(mask.mean()))
        res.timings["drawing"] = time.perf_counter() - t
        outliers = [n for n, keep in zip(res.names, res.inliers) if not keep]
        line = (f"{len(images)} images, k={res.k} clusters, salient {res.salient.tolist()}, foreground "
                + " / ".join(f"{100 * f:.1f}%" for f in fractions)
                + (f", outliers: {', '.join(outliers)}" if outliers else ""))
        summary = {"k": res.k, "salient_clusters": res.salient.tolist(), "votes": res.votes.tolist(),
                   "foreground_fraction": dict(zip(res.names, fractions)),
                   "inliers": dict(zip(res.names, map(bool, res.inliers))),
                   "grabcut_applied": dict(zip(res.names, res.grabcut_applied)),
                   "timings": {k: round(v, 3) for k, v in res.timings.items()}}
        return line, summary

    return run_sets(PROG, args, sets, planned, process, min_images=2)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
