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

With ``--protocol geoaware`` it runs GeoAware-SC's zero-shot protocol (CVPR 2024, DINOv2 part; docs/geoaware.md):
DINOv2 ViT-B/14 block 11 tokens on 840 px letterboxed images, window soft-argmax (N = 5), pose alignment by the
mirrored source (flip-mask, masks from <root>/features/<category>/<image>_mask.png unless --masks), and adds the
reference's per-image PCK@0.1/0.05/0.01 and geometry-aware PCK@0.1 to pck.csv (records.jsonl keeps pred_kps
and flipped per pair). Any flag given explicitly overrides the preset.

Example:
    python benchmarks/spair.py --root /data/SPair-71k --split test --stride 4 --layer 9 --bin --out runs/spair
    python benchmarks/spair.py --root /data/SPair-71k --split test --protocol geoaware --out runs/geoaware
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from densevit.models.provenance import weights_provenance
from densevit.cli.common import add_backbone_args, build_extractor, run_cli
from densevit.cli.flags import add_config_flags
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
from densevit.matching.geoaware import GeoAwareOptions
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
    g = p.add_argument_group("GeoAware-SC protocol (docs/geoaware.md)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="dvf",
                   help="dvf: the flags as given (Deep ViT Features' protocol); geoaware: GeoAware-SC's zero-shot "
                        "configuration in one flag (" + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                             for k, v in GEOAWARE_PRESET.items()) + ")")
    add_config_flags(g, GeoAwareOptions)
    return p


PROTOCOLS = ("dvf", "geoaware")
# the reference's zero-shot configuration (configs/eval_zero_shot_spair.yaml, preprocess_map.py)
GEOAWARE_PRESET = {"backbone": "dinov2_vitb14", "stride": 14, "load_size": 840, "layer": 11, "facet": "token",
                   "refine": "window-softargmax", "window": 5, "pose_align": "flip-mask"}


def _given(argv: Sequence[str], dest: str) -> bool:
    flag = "--" + dest.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def apply_protocol(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Under ``--protocol geoaware`` the preset's values for every flag not typed on the command line."""
    if args.protocol == "geoaware":
        for k, v in GEOAWARE_PRESET.items():
            if not _given(argv, k):
                setattr(args, k, v)


def _main(argv: Optional[Sequence[str]], ctx: dist.DistContext) -> int:
    from tqdm import tqdm

    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    apply_protocol(args, argv)
    args.device = ctx.device(args.device)
    check_facet(args.facet)
    dataset = SPair(args.root, args.split, args.layout, args.categories, args.limit)
    if len(dataset) == 0:
        raise DensevitError("no pairs selected")
    geoaware = args.protocol == "geoaware" or args.pose_align != "none" or args.refine == "window-softargmax"
    if geoaware:
        return _geoaware(args, dataset, ctx)
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


def _geoaware(args: argparse.Namespace, dataset: SPair, ctx: dist.DistContext) -> int:
    """The GeoAware-SC protocol over the selected pairs (one process)."""
    from tqdm import tqdm

    from densevit.eval.datasets.spair import parse_pair_name
    from densevit.eval.geoaware import (CanvasDescriber, GeoAwareImage, GeoAwareSettings, evaluate_geoaware,
                                        used_ids)
    from densevit.eval.metrics.pck import PairRecord, bbox_size, image_size, valid_points
    from densevit.io.images import load_image
    from densevit.io.letterbox import letterbox_geometry

    if ctx.world_size > 1:
        raise DensevitError("the GeoAware protocol runs in one process (no torchrun)")
    masks = args.masks
    mask_kind = "saliency" if masks == "saliency" else "file"
    masks_dir = None if masks == "saliency" else (masks or str(Path(args.root) / "features"))
    settings = GeoAwareSettings(pose_align=args.pose_align, refine=args.refine, window=args.window,
                                anno_size=args.anno_size, load_size=args.load_size, layer=args.layer,
                                facet=args.facet, masks=mask_kind, masks_dir=masks_dir)
    settings.check()
    if args.bin:
        raise DensevitError("the GeoAware protocol uses plain descriptors (no --bin)")
    record_settings = {"benchmark": "spair", "protocol": "geoaware" if args.protocol == "geoaware" else "custom",
                       "root": str(Path(args.root).resolve()), "split": dataset.split, "layout": args.layout,
                       "backbone": args.backbone, "weights": args.weights, "stride": args.stride,
                       "dtype": args.dtype, "geoaware": vars(settings), "masks_used": settings.describe_masks(),
                       "categories": args.categories, "limit": args.limit, "device": args.device,
                       "cache": args.cache}
    log = ResultsLog(args.out, record_settings, overwrite=args.overwrite,
                     volatile=("categories", "limit", "device", "cache"))
    todo = [n for n in dataset.names if not log.done(n)]
    extractor = build_extractor(args)
    weights_id = (file_fingerprint(args.weights) if args.weights and Path(args.weights).is_file()
                  else args.weights)
    describe = CanvasDescriber(extractor, settings, keep=max(4, args.keep_images), cache_dir=args.cache,
                               identity={"backbone": args.backbone, "weights": weights_id, "root": record_settings["root"]})
    annotations: dict = {}

    def annotation(cat: str, imname: str):
        key = (cat, imname)
        if key not in annotations:
            annotations[key] = dataset.image_annotation(cat, imname)
        return annotations[key]

    used: dict = {}

    def used_of(cat: str):
        # the reference's used_points: ids visible in some image of the category's pairs of the split (all of them)
        if cat not in used:
            everything = SPair(args.root, dataset.split, args.layout, [cat])
            kps = []
            for n in everything.names:
                _, s, t, _ = parse_pair_name(n)
                kps += [annotation(cat, s).kps, annotation(cat, t).kps]
            used[cat] = used_ids(kps)
        return used[cat]

    def image(cat: str, imname: str) -> GeoAwareImage:
        ann = annotation(cat, imname)
        path = dataset.image_path(cat, imname)
        return GeoAwareImage(f"{cat}/{imname}", lambda: load_image(path), cat, ann.kps, (ann.hw[1], ann.hw[0]),
                             Path(imname).stem)

    print(f"GeoAware protocol: {args.backbone} layer {args.layer} {args.facet}, {args.load_size} px canvas, "
          f"anno {args.anno_size}, refine {args.refine} (window {args.window}), pose alignment {args.pose_align}, "
          f"masks: {settings.describe_masks()}")
    t0 = time.perf_counter()
    for name in tqdm(todo, desc=f"SPair {dataset.split} (GeoAware)", unit="pair", disable=args.quiet):
        sp = dataset.pair(name)
        src, trg = image(sp.category, sp.src_imname), image(sp.category, sp.trg_imname)
        ids = used_of(sp.category)
        res = evaluate_geoaware(describe, src, trg, ids, sp.trg_bndbox, settings)
        geo_t = letterbox_geometry(trg.wh, settings.anno_size)
        pred_all = geo_t.to_image(res.pred_canvas)
        rows = [ids.index(int(k)) if int(k) in ids else -1 for k in sp.kps_ids]
        pred = torch.stack([pred_all[r] if r >= 0 else torch.full((2,), float("nan"), dtype=torch.float64)
                            for r in rows]) if rows else torch.zeros(0, 2, dtype=torch.float64)
        ok = valid_points(sp.src_kps, sp.trg_kps)
        rec = PairRecord.from_prediction(sp.name, sp.category, pred, sp.trg_kps, bbox_size(sp.trg_bndbox),
                                         image_size(sp.trg_hw), valid=ok, flags=sp.flags, seconds=res.seconds)
        rec.extra = {"pred_kps": [[round(float(v), 4) for v in p] for p in pred.tolist()], "flipped": res.flipped,
                     "original_dist": res.original_dist, "flip_dist": res.flip_dist, "pck_img": res.pck_img,
                     "pck_img_geo": res.pck_img_geo, "n_geo": res.n_geo}
        log.add(rec)
    wall = time.perf_counter() - t0
    extra = {"device": str(extractor.device), "pairs_run_now": len(todo), "wall_seconds_now": wall,
             "wall_seconds_per_pair_now": wall / len(todo) if todo else None,
             "images_computed_now": describe.computed,
             "descriptor_seconds_per_image_now": describe.seconds / describe.computed if describe.computed else None,
             "masks": settings.describe_masks()}
    title = (f"SPair-71k {dataset.split} PCK, GeoAware protocol: {args.backbone} layer {args.layer} {args.facet} "
             f"{args.load_size} px, refine {args.refine} N={args.window}, pose {args.pose_align}, "
             f"masks: {settings.describe_masks()}")
    table = log.finish(dataset.names, args.alphas, args.threshold, () if args.no_breakdown else PAIR_FLAGS,
                       title, extra)
    print(table)
    if todo:
        print(f"{len(todo)} pairs in {wall:.1f} s ({wall / len(todo):.2f} s/pair, {describe.computed} images "
              f"described, device {extractor.device}); results in {log.dir}")
    else:
        print(f"all {len(dataset)} pairs already done; results in {log.dir}")
    return 0


main = dist.main_with_session(_main)

if __name__ == "__main__":
    run_cli(main, "benchmarks/spair.py")()
