#!/usr/bin/env python
"""SPair-71k semantic-correspondence benchmark: PCK@alpha of dense keypoint transfer.

Reads the official release layout (JPEGImages/, ImageAnnotation/, PairAnnotation/{trn,val,test}/, Layout/),
transfers each pair's source keypoints to the target by descriptor nearest neighbour (optionally soft-argmax
refined) and scores PCK@alpha with the SPair threshold alpha * max(h, w) of the target box (or of the image,
--threshold image), per point and per image, per category and overall, with breakdowns by the pair's
difficulty flags. Descriptors are computed once per image (in memory; on disk too with --cache).
Outputs in --out: pck.csv, pck.txt, records.jsonl (per pair), settings.json. Rerunning with the same settings
resumes where it stopped (--limit and --categories may change between runs). Under
``torchrun --nproc_per_node N`` the pairs still to do are dealt to the ranks round-robin; each rank logs its
records, and rank 0 merges them and scores: the same table as one process.

Example:
    python benchmarks/spair.py --root /data/SPair-71k --split test --stride 4 --layer 9 --bin --out runs/spair
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional, Sequence

from densevit.models.provenance import weights_provenance
from densevit.cli.common import add_backbone_args, build_extractor, run_cli
from densevit.errors import DensevitError
from densevit.eval.datasets.spair import PAIR_FLAGS, SPLITS, SPair
from densevit.eval.keypoints import (
    EvalPair,
    ImageDescriber,
    ResultsLog,
    TransferSettings,
    add_scoring_args,
    check_facet,
    evaluate_pair,
)
from densevit.runtime import dist
from densevit.io.files import file_fingerprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/spair.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="SPair-71k folder (holding PairAnnotation/, JPEGImages/ ...)")
    p.add_argument("--split", default="test", help=f"one of {', '.join(SPLITS)}")
    p.add_argument("--layout", default="large", help="Layout/<layout>/<split>.txt gives the pair list and order")
    p.add_argument("--categories", nargs="+", default=None, help="only these categories")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs (after --categories)")
    p.add_argument("--out", required=True, help="output folder (resumed when it holds results of the same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace results of other settings in --out")
    p.add_argument("--cache", default=None, help="on-disk descriptor cache folder (reused across runs)")
    p.add_argument("--keep-images", type=int, default=32, help="descriptor sets kept in memory")
    add_backbone_args(p, stride="half", load_size=224, layer=9, facet="key")
    p.add_argument("--bin", action="store_true", help="log-binned descriptors")
    e = add_scoring_args(p)
    e.add_argument("--no-breakdown", action="store_true", help="no rows per difficulty flag")
    return p


def _main(argv: Optional[Sequence[str]], ctx: dist.DistContext) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    args.device = ctx.device(args.device)
    check_facet(args.facet)
    dataset = SPair(args.root, args.split, args.layout, args.categories, args.limit)
    if len(dataset) == 0:
        raise DensevitError("no pairs selected")
    transfer = TransferSettings(args.refine, args.window, args.temperature)
    settings = {"benchmark": "spair", "root": str(Path(args.root).resolve()), "split": dataset.split,
                "layout": args.layout, "backbone": args.backbone, "weights": args.weights, "stride": args.stride,
                "load_size": args.load_size, "layer": args.layer, "facet": args.facet, "bin": args.bin,
                "dtype": args.dtype, "transfer": vars(transfer), "categories": args.categories,
                "limit": args.limit, "device": args.device, "cache": args.cache,
                "provenance": weights_provenance(args.weights, args.backbone)}
    log = None

    def plan() -> List[str]:
        nonlocal log
        log = ResultsLog(args.out, settings, overwrite=args.overwrite, volatile=("categories", "limit", "device",
                                                                                 "cache"))
        return [n for n in dataset.names if not log.done(n)]

    all_todo = ctx.on_main(plan)
    if not ctx.is_main:
        log = ResultsLog.for_rank(args.out, ctx.rank)
    todo = ctx.shard(all_todo)
    extractor = build_extractor(args)
    weights_id = (file_fingerprint(args.weights) if args.weights and Path(args.weights).is_file()
                  else args.weights)
    describe = ImageDescriber(extractor, args.load_size, args.layer, args.facet, args.bin, cache_dir=args.cache,
                              keep=args.keep_images, identity={"backbone": args.backbone, "weights": weights_id})

    t0 = time.perf_counter()
    for name in tqdm(todo, desc=f"SPair {dataset.split}", unit="pair", disable=args.quiet or not ctx.is_main):
        sp = dataset.pair(name)
        pair = EvalPair(sp.name, sp.category,
                        f"{sp.category}/{sp.src_imname}", dataset.image_path(sp.category, sp.src_imname),
                        f"{sp.category}/{sp.trg_imname}", dataset.image_path(sp.category, sp.trg_imname),
                        sp.src_kps, sp.trg_kps, sp.trg_bndbox, sp.trg_hw, sp.flags)
        log.add(evaluate_pair(describe, pair, transfer))
    log._log.flush()
    wall = time.perf_counter() - t0
    counts = ctx.gather((describe.computed, describe.seconds))   # also the barrier after every rank's pairs
    if not ctx.is_main:
        log._log.close()
        return 0
    log.merge_ranks()
    computed, seconds = sum(c for c, _ in counts), sum(s for _, s in counts)
    todo = all_todo
    extra = {"device": str(extractor.device), "processes": ctx.world_size, "pairs_run_now": len(todo),
             "wall_seconds_now": wall, "wall_seconds_per_pair_now": wall / len(todo) if todo else None,
             "images_computed_now": computed,
             "descriptor_seconds_per_image_now": seconds / computed if computed else None}
    title = (f"SPair-71k {dataset.split} PCK ({args.threshold} threshold) {args.backbone} stride {args.stride} "
             f"layer {args.layer} {args.facet}{' bin' if args.bin else ''} load {args.load_size} refine {args.refine}")
    table = log.finish(dataset.names, args.alphas, args.threshold, () if args.no_breakdown else PAIR_FLAGS,
                       title, extra)
    print(table)
    if todo:
        print(f"{len(todo)} pairs in {wall:.1f} s ({wall / len(todo):.2f} s/pair, {computed} images "
              f"described, device {extractor.device}); results in {log.dir}")
    else:
        print(f"all {len(dataset)} pairs already done; results in {log.dir}")
    return 0


main = dist.main_with_session(_main)

if __name__ == "__main__":
    run_cli(main, "benchmarks/spair.py")()
