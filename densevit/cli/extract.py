"""densevit-extract: write dense descriptors (and saliency) of images to .npz files, or of a whole dataset to a
feature store (``--store DIR``: batched, resumable, multi-process under torchrun)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import DensevitError
from ..features.extractor import FACETS
from ..io.images import UnreadableImageError
from ..models.registry import BACKBONES
from .common import (
    add_backbone_args,
    build_extractor,
    check_outputs,
    gather_images,
    report_unreadable,
    run_cli,
    skip_unreadable,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densevit-extract", description=__doc__)
    p.add_argument("images", nargs="*", help="image files and/or folders of images")
    p.add_argument("-o", "--out", help="output folder (one <image-stem>.npz per image)")
    add_backbone_args(p, layer=None, facet=None)
    p.add_argument("--layer", type=int, nargs="+", default=[11],
                   help="block index, 0-based (-1 = last); several with --store")
    p.add_argument("--facet", nargs="+", default=["key"],
                   choices=list(FACETS), help="facet(s); several with --store (key_rope/query_rope: after the "
                   "rotary embedding, rotary backbones only)")
    d = p.add_argument_group("dataset mode (a feature store instead of .npz files)")
    d.add_argument("--store", help="feature store folder: raw descriptors of every image in safetensors shards "
                   "with a manifest; rerunning the same command finishes what is missing, another image list "
                   "adds its images (the stored ones are kept); one writer at a time; run under "
                   "`torchrun --nproc_per_node N` for N processes")
    d.add_argument("--prune", action="store_true",
                   help="remove the stored images that are not in this run's list (and replace stored images "
                   "that have an input's key but another file)")
    d.add_argument("--batch-size", type=int, default=8, help="images per forward pass (one resized shape)")
    d.add_argument("--workers", type=int, default=2, help="decoding worker processes per rank (0: in the main one)")
    d.add_argument("--writers", type=int, default=2, help="shard-writing threads per rank")
    d.add_argument("--store-dtype", default="float16", choices=["float16", "float32"], help="stored descriptor dtype")
    d.add_argument("--shard-size", type=int, default=256, help="images per shard")
    d.add_argument("--fast-decode", action="store_true",
                   help="decode large JPEGs at a reduced scale (PIL draft mode) before the exact resize")
    d.add_argument("--recursive", action="store_true", help="also take images in sub-folders of folder inputs")
    d.add_argument("--content-hash", action="store_true",
                   help="identify source images by SHA-256 of their bytes (default: path, size and mtime)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--stats", help="write the run's timing report (images, decode/forward/write/wait seconds per "
                   "rank) to this JSON file")
    p.add_argument("--bin", action="store_true", help="log-binned descriptors (17 bins)")
    p.add_argument("--saliency", action="store_true", help="also write the CLS-attention saliency map")
    p.add_argument("--include-cls", action="store_true", help="keep the CLS token as the first descriptor")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (with --store: empty the store first)")
    p.add_argument("--list-backbones", action="store_true", help="list the known backbones and exit")
    return p


def _flatten_attn(a: np.ndarray) -> np.ndarray:
    """``heads x T x T`` attention -> ``T x (T*heads)`` descriptors, head-minor as the reference."""
    return a.transpose(1, 2, 0).reshape(a.shape[1], -1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_backbones:
        for name, spec in BACKBONES.items():
            print(f"{name:18s} {spec.hub_name:42s} patch {spec.patch_size:2d}  {spec.supervision:10s} "
                  f"{spec.pos.describe()}")
        return 0
    if args.store:
        return _store_main(args)
    if args.prune:
        raise DensevitError("--prune applies to a feature store (--store DIR)")
    if not args.images or not args.out:
        raise DensevitError("give at least one image and an output folder (-o OUT), or a feature store (--store DIR)")
    if len(args.layer) != 1 or len(args.facet) != 1:
        raise DensevitError("several layers or facets need a feature store (--store DIR); .npz files hold one")
    args.layer, args.facet = args.layer[0], args.facet[0]
    images = gather_images(args.images)
    out_dir = Path(args.out)
    targets = [out_dir / f"{img.stem}.npz" for img in images]
    if len(set(targets)) != len(targets):
        raise DensevitError("two inputs share a file name stem; extract them into separate output folders")
    todo = [(img, t) for img, t in zip(images, targets) if args.overwrite or not t.exists()]
    check_outputs(args.images, folders=[out_dir], files=[t for _, t in todo], overwrite=True)  # existing: skipped
    skipped = len(images) - len(todo)
    if skipped:
        print(f"densevit-extract: {skipped} output(s) exist, skipped (use --overwrite to replace)", file=sys.stderr)
    if not todo:
        return 0
    ext = build_extractor(args)
    ext.resolve_layer(args.layer)  # validate before any work
    layer = args.layer
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    unreadable = []
    for img, target in tqdm(todo, desc="extract", unit="img", disable=len(todo) < 2):
        try:
            x, grid = ext.preprocess(img, args.load_size)
            feats = ext.extract(x, (layer,), (args.facet,), bin=args.bin, include_cls=args.include_cls,
                                saliency=args.saliency, image_hw=grid.image_hw)
        except UnreadableImageError as exc:
            skip_unreadable("densevit-extract", exc)
            unreadable.append(img)
            continue
        except DensevitError as exc:
            tqdm.write(f"densevit-extract: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        desc = feats.descriptors[(layer, args.facet)][0].float().cpu().numpy()
        if args.facet == "attn":
            desc = _flatten_attn(desc)
        arrays = dict(descriptors=desc, num_patches=np.array(grid.shape), input_hw=np.array(grid.input_hw),
                      image_hw=np.array(grid.original_hw), stride=np.array(ext.stride),
                      patch_size=np.array(ext.patch_size), layer=np.array(args.layer), facet=np.array(args.facet),
                      backbone=np.array(ext.spec.name), binned=np.array(args.bin))
        if feats.saliency is not None:
            arrays["saliency"] = feats.saliency[0].float().cpu().numpy()
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(target)
    return max(1 if failures else 0, report_unreadable("densevit-extract", unreadable))


def _store_main(args: argparse.Namespace) -> int:
    """Dataset mode: every rank (one process, or each one torchrun started) runs this."""
    from ..runtime import dist
    from ..storage.extract import ExtractionConfig, extract_to_store, gather_dataset

    if not args.images:
        raise DensevitError("give images or folders to extract into the store")
    if args.bin or args.include_cls:
        raise DensevitError("a store keeps raw descriptors (bin at read time: FeatureStore.descriptors(..., bin=True))"
                            " and always the CLS descriptor; drop --bin / --include-cls")
    if args.batch_size < 1 or args.workers < 0 or args.shard_size < 1 or args.writers < 1:
        raise DensevitError("--batch-size, --shard-size and --writers must be >= 1, --workers >= 0")
    check_outputs(args.images, folders=[args.store], overwrite=True)     # the store only grows: never into inputs
    with dist.session() as ctx:
        items = gather_dataset(args.images, args.recursive)
        args.device = ctx.device(args.device)
        ext = build_extractor(args)
        for l in args.layer:
            ext.resolve_layer(l)
        cfg = ExtractionConfig(layers=args.layer, facets=args.facet, load_size=args.load_size, saliency=args.saliency,
                               store_dtype=args.store_dtype, fast_decode=args.fast_decode, batch_size=args.batch_size,
                               workers=args.workers, writers=args.writers, shard_size=args.shard_size,
                               content_hash=args.content_hash, overwrite=args.overwrite, prune=args.prune,
                               progress=not args.quiet)
        report = extract_to_store(ext, items, Path(args.store), cfg, args.weights, ctx)
    if ctx.is_main:
        print(f"store {args.store}: {_change_line(report.change, args.overwrite)}")
        sec = report.seconds
        rate = report.images / sec["total"] if sec["total"] > 0 else 0.0
        print(f"store {args.store}: {report.images} image(s) extracted in {report.computed_shards} shard(s), "
              f"{report.reused_shards} shard(s) already complete, {len(report.failed)} failed; "
              f"{rate:.2f} img/s over {ctx.world_size} process(es) (decode {sec['decode']:.1f} s, forward "
              f"{sec['forward']:.1f} s, write {sec['write']:.1f} s, waiting {sec['wait']:.1f} s)")
        if args.stats:
            import json

            Path(args.stats).parent.mkdir(parents=True, exist_ok=True)
            Path(args.stats).write_text(json.dumps(
                {"world_size": ctx.world_size, "images": report.images, "computed_shards": report.computed_shards,
                 "reused_shards": report.reused_shards, "failed": report.failed, "seconds": sec,
                 "window": report.window, "per_rank": report.per_rank}, indent=1) + "\n")
        report_unreadable("densevit-extract", list(report.failed))
    return 1 if report.failed else 0


def _change_line(change, overwrite: bool) -> str:
    """``"24 kept, 2 added"`` (and what was re-extracted or removed, naming the first removed images)."""
    line = f"{len(change.get('kept', []))} kept, {len(change.get('added', []))} added"
    if change.get("updated"):
        line += f", {len(change['updated'])} re-extracted (file changed)"
    removed = change.get("removed", [])
    if removed:
        names = ", ".join(removed[:3]) + (", ..." if len(removed) > 3 else "")
        line += f", {len(removed)} removed by {'--overwrite' if overwrite else '--prune'} ({names})"
    return line


entry = run_cli(main, "densevit-extract")

if __name__ == "__main__":
    entry()
