#!/usr/bin/env python
"""Geometric-truth correspondence benchmark: real images under known random warps, scored with PCK.

Sources are the shared photographs and DAVIS-2016 frames (keypoints on the object mask); each pair is a source
and a copy warped by kornia (flip, rotation, scale, translation, perspective, resized crop, photometric
changes), so every source keypoint has an exact target. Keypoints are transferred with dense descriptor nearest
neighbours (optionally soft-argmax refined) and scored with PCK@alpha relative to the target object's box
(or the image). Outputs in --out: pck.csv, pck.txt, records.jsonl (per pair), settings.json (everything that
defines the numbers, versions, time per pair). Rerunning with the same settings resumes.

Example (CPU, golden random weights):
    python benchmarks/warp.py --weights ../shared/golden/vits8_random_fp16.pth --stride 8 --layer 9 --out runs/warp_s8_l9
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional, Sequence

from densevit.models.provenance import weights_provenance
from densevit.cli.common import add_backbone_args, build_extractor, run_cli
from densevit.errors import DensevitError
from densevit.eval.datasets.warp import WarpConfig, default_sources, make_warp_pair
from densevit.eval.keypoints import (
    EvalPair,
    ImageDescriber,
    ResultsLog,
    TransferSettings,
    add_scoring_args,
    check_facet,
    evaluate_pair,
)

BREAKDOWN = ("mirror", "scale_variation", "rotation", "perspective")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/warp.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (resumed when it holds results of the same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace results of other settings in --out")
    add_backbone_args(p, stride="half", load_size=224, layer=9, facet="key")
    p.add_argument("--bin", action="store_true", help="log-binned descriptors")
    d = p.add_argument_group("pairs")
    d.add_argument("--pairs", type=int, default=56, help="number of warp pairs (cycling over the sources)")
    d.add_argument("--points", type=int, default=20, help="keypoints per pair")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=512, help="longer side of the source images")
    d.add_argument("--sources", nargs="+", default=["photos", "davis"], choices=["photos", "davis"])
    d.add_argument("--davis-frames", type=int, nargs="+", default=[0], help="frame indices per DAVIS sequence")
    d.add_argument("--shared", default=None, help="shared data folder (default: densevit.io.paths.shared_dir())")
    d.add_argument("--degrees", type=float, default=WarpConfig.degrees)
    d.add_argument("--scale", type=float, nargs=2, default=WarpConfig.scale)
    d.add_argument("--translate", type=float, default=WarpConfig.translate, help="max shift (fraction of size)")
    d.add_argument("--perspective", type=float, default=WarpConfig.perspective)
    d.add_argument("--flip-p", type=float, default=WarpConfig.flip_p)
    d.add_argument("--crop-scale", type=float, nargs=2, default=WarpConfig.crop_scale)
    d.add_argument("--no-photometric", action="store_true", help="geometric warps only")
    add_scoring_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    check_facet(args.facet)
    if args.pairs < 1 or args.points < 1:
        raise DensevitError("--pairs and --points must be positive")
    config = WarpConfig(flip_p=args.flip_p, degrees=args.degrees, scale=tuple(args.scale),
                        translate=args.translate, perspective=args.perspective, crop_scale=tuple(args.crop_scale),
                        photometric=not args.no_photometric, num_points=args.points)
    transfer = TransferSettings(args.refine, args.window, args.temperature)
    settings = {"benchmark": "warp", "backbone": args.backbone, "weights": args.weights, "stride": args.stride,
                "load_size": args.load_size, "layer": args.layer, "facet": args.facet, "bin": args.bin,
                "dtype": args.dtype, "seed": args.seed, "image_size": args.image_size, "sources": args.sources,
                "davis_frames": args.davis_frames, "warp": config.to_dict(), "transfer": vars(transfer),
                "pairs": args.pairs, "device": args.device,
                "provenance": weights_provenance(args.weights, args.backbone)}
    log = ResultsLog(args.out, settings, overwrite=args.overwrite, volatile=("pairs", "device"))
    sources = default_sources(args.shared, args.image_size, args.davis_frames,
                              photos="photos" in args.sources, davis="davis" in args.sources)
    extractor = build_extractor(args)
    describe = ImageDescriber(extractor, args.load_size, args.layer, args.facet, args.bin, keep=4)

    names: List[str] = [f"{i:05d}-{sources[i % len(sources)].name}" for i in range(args.pairs)]
    todo = sorted((i for i in range(args.pairs) if not log.done(names[i])), key=lambda i: (i % len(sources), i))
    t0 = time.perf_counter()
    for i in tqdm(todo, desc="warp pairs", unit="pair", disable=args.quiet):
        src = sources[i % len(sources)]
        wp = make_warp_pair(src, args.seed * 1_000_003 + i, config, name=names[i])
        pair = EvalPair(wp.name, wp.category, f"source:{src.name}", wp.src_image, f"target:{wp.name}",
                        wp.trg_image, wp.src_kps, wp.trg_kps, wp.trg_bbox, wp.trg_hw, wp.flags)
        log.add(evaluate_pair(describe, pair, transfer))
    wall = time.perf_counter() - t0
    extra = {"device": str(extractor.device), "pairs_run_now": len(todo),
             "wall_seconds_now": wall, "wall_seconds_per_pair_now": wall / len(todo) if todo else None,
             "descriptor_seconds_per_image_now": describe.seconds / describe.computed if describe.computed else None}
    title = (f"warp PCK ({args.threshold} threshold) {args.backbone} stride {args.stride} layer {args.layer} "
             f"{args.facet}{' bin' if args.bin else ''} load {args.load_size} refine {args.refine}")
    table = log.finish(names, args.alphas, args.threshold, BREAKDOWN, title, extra)
    print(table)
    if todo:
        print(f"{len(todo)} pairs in {wall:.1f} s ({wall / len(todo):.2f} s/pair, device {extractor.device}); "
              f"results in {log.dir}")
    else:
        print(f"all {len(names)} pairs already done; results in {log.dir}")
    return 0


if __name__ == "__main__":
    run_cli(main, "benchmarks/warp.py")()
