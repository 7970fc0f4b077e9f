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

from densevit.cli.common import add_backbone_args, add_store_arg, build_source, gather_sets, run_cli
from densevit.errors import DensevitError

from .. import draw
from ..common import SALIENCY_SOURCES, UPSAMPLINGS
from ..coseg import GRABCUT_SEEDINGS, CosegConfig, cosegment
from .common import add_io_args, load_size_arg, run_sets, stems

PROG = "densevit-coseg"


def add_coseg_args(parser: argparse.ArgumentParser, d=CosegConfig()) -> None:
    """Clustering, voting, saliency and up-sampling flags shared by co-segmentation and part co-segmentation."""
    g = parser.add_argument_group("co-segmentation (defaults: the reference's)")
    g.add_argument("--bin", action=argparse.BooleanOptionalAction, default=d.bin, help="log-binned descriptors")
    g.add_argument("--thresh", type=float, default=d.thresh, help="saliency threshold of a cluster vote")
    g.add_argument("--elbow", type=float, default=d.elbow, help="elbow coefficient for choosing k")
    g.add_argument("--votes-percentage", type=float, default=d.votes_percentage,
                   help="%% of images that must vote for a cluster to make it foreground")
    g.add_argument("--sample-interval", type=int, default=d.sample_interval,
                   help="fit k-means on every n-th descriptor of each image")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="k-means seed (default: FAISS's own, as the reference)")
    g.add_argument("--max-points-per-centroid", type=int, default=d.max_points_per_centroid,
                   help="FAISS k-means trains on a random subsample of at most this many rows per centroid "
                        "(FAISS's default, as the reference); 0: train on every sampled descriptor")
    g.add_argument("--saliency-source", choices=SALIENCY_SOURCES, default=d.saliency_source,
                   help="reference: saliency from a second, stride-8 pass on the half-size image (the reference's "
                        "low_res_saliency_maps); same-pass: the CLS attention of the descriptor pass (one forward "
                        "pass fewer; needed with --store)")
    g.add_argument("--upsample-masks", choices=UPSAMPLINGS, default=d.upsample_masks,
                   help="token map -> pixels of the resized image: reference (nearest resize, as the reference) "
                        "or token-centre (each pixel takes the token whose centre is nearest)")


def kmeans_cap_arg(value: int) -> Optional[int]:
    """``--max-points-per-centroid`` 0 (or less) means: no cap."""
    return None if value is None or value <= 0 else int(value)


def check_saliency_source(args: argparse.Namespace) -> None:
    """The reference's saliency needs a second pass of the model, which a feature store cannot give."""
    if getattr(args, "store", None) and args.saliency_source == "reference":
        raise DensevitError("--store holds the saliency of its own pass only: add --saliency-source same-pass "
                            "(the reference's low-resolution saliency needs the model)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Co-segment the common foreground object of each set of "
                                "images (ViT descriptors: k-means, saliency voting, GrabCut).")
    add_io_args(p)
    add_coseg_args(p)
    d = CosegConfig()
    g = p.add_argument_group("refinement and outliers")
    g.add_argument("--no-grabcut", action="store_true", help="skip the GrabCut refinement")
    g.add_argument("--grabcut-seed", type=int, default=d.grabcut_seed,
                   help="seed of OpenCV's random generator for GrabCut (0: its initial state, what the unseeded "
                        "reference draws)")
    g.add_argument("--grabcut-seeding", choices=GRABCUT_SEEDINGS, default=d.grabcut_seeding,
                   help="set: seed once per set, the images draw from one stream in order (the reference); "
                        "image: reseed before each image (a mask does not depend on the set's other images)")
    g.add_argument("--remove-outliers", action="store_true",
                   help="leave out images whose CLS descriptor is far from the set's mean (they get empty masks)")
    g.add_argument("--outliers-thresh", type=float, default=d.outliers_thresh,
                   help="cosine similarity to the mean CLS descriptor below which an image is an outlier")
    add_backbone_args(p, stride=4, load_size=224, layer=11, facet="key")
    add_store_arg(p)
    return p


def config_from_args(args: argparse.Namespace) -> CosegConfig:
    cfg = CosegConfig(load_size=load_size_arg(args.load_size), layer=args.layer, facet=args.facet, bin=args.bin,
                      thresh=args.thresh, elbow=args.elbow, votes_percentage=args.votes_percentage,
                      sample_interval=args.sample_interval, remove_outliers=args.remove_outliers,
                      outliers_thresh=args.outliers_thresh, grabcut=not args.no_grabcut, seed=args.seed,
                      max_points_per_centroid=kmeans_cap_arg(args.max_points_per_centroid),
                      saliency_source=args.saliency_source, upsample_masks=args.upsample_masks,
                      grabcut_seed=args.grabcut_seed, grabcut_seeding=args.grabcut_seeding)
    cfg.validate()
    return cfg


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
