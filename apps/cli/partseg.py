"""densevit-partseg: part co-segmentation of sets of images (Amir et al. 2021).

    densevit-partseg IMAGES... | FOLDER | FOLDER_OF_SETS  --out DIR [--num-parts 4] [--three-stages]

Per image: ``<stem>_parts.png`` (original size, indexed PNG: 0 background, part i stored as i + 1, palette =
the overlay colours) and ``<stem>_overlay.png`` (parts in colour, background faded); per set ``summary.json``
and one summary line on stdout. The smoothing is a dense CRF when pydensecrf is installed (``--crf dense``),
otherwise its documented approximation (``--crf approx``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from densevit.runtime.progress import track
from densevit.cli.common import run_cli
from densevit.errors import DensevitError
from densevit.features.upsampled import UpsampleOptions

from .. import draw

from ..partseg import PartsegConfig, crf_backend, part_cosegment
from .common import clustering_inputs, planned_pictures, run_sets, sets_parser, stems, timed, validated_config

PROG = "densevit-partseg"


def build_parser() -> argparse.ArgumentParser:
    return sets_parser(PROG, "Co-segment the common object of each set of images into parts consistent across "
                       "the set (ViT descriptors, k-means, dense CRF).",
                       (PartsegConfig, "part co-segmentation (defaults: the reference's)"),
                       (UpsampleOptions, "pixel-dense features"))


def config_from_args(args: argparse.Namespace) -> PartsegConfig:
    cfg = validated_config(PartsegConfig, args)
    crf_backend(cfg.crf)                        # dense asked for and pydensecrf missing: one line now
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.store and cfg.num_crop_augmentations:
        raise DensevitError("--num-crop-augmentations needs the model (crops of each image and of its flip are "
                            "not in a feature store); leave it out with --store")
    sets, source = clustering_inputs(args)
    planned = planned_pictures("parts", "overlay")

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        res = part_cosegment(source, images, cfg)
        coverage = [np.bincount(p.ravel() + 1, minlength=res.num_parts + 1)[1:] / p.size for p in res.parts]
        empty = [i for i in range(res.num_parts) if all(c[i] == 0 for c in coverage)]
        with timed(res.timings, "drawing"):
            for stem, image, parts in track(list(zip(stems(images), res.images, res.parts)), "drawing"):
                draw.save_labels(out / f"{stem}_parts.png", parts)
                draw.save_rgb(out / f"{stem}_overlay.png", draw.parts_overlay(image, parts, res.num_parts,
                                                                              max_side=args.max_side, empty=empty))
        line = (f"{len(images)} images, {res.num_parts} parts (k={res.k_fg} stage-1 clusters, salient "
                f"{res.salient.tolist()}), crf {res.crf}, part pixels "
                + " / ".join(f"{100 * c.sum():.1f}%" for c in coverage))
        summary = {"num_parts": res.num_parts, "k_stage1": res.k_fg, "salient_clusters": res.salient.tolist(),
                   "common_clusters": None if res.common is None else res.common.tolist(), "crf": res.crf,
                   "part_fraction": {n: [round(float(v), 5) for v in c] for n, c in zip(res.names, coverage)},
                   "timings": res.timings}
        return line, summary

    return run_sets(PROG, args, sets, planned, process, min_images=2, source=source)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
