"""densevit-extract: write dense descriptors (and saliency) of images to .npz files, or of a whole dataset to a
feature store (``--store DIR``: batched, resumable, multi-process under torchrun)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..models.provenance import provenance_fields
from ..errors import DensevitError
from ..io.files import atomic_write, atomic_write_text, check_outputs
from ..io.images import UnreadableImageError, gather_images, image_size, report_unreadable, resized_hw, skip_unreadable
from ..io.limits import DEFAULT_MAX_OUTPUT_MIB, check_output_bytes
from ..models.registry import BACKBONES
from ..features.upsampled import UpsampleOptions
from ..options import opt
from ..storage.extract import ExtractionConfig
from .common import OutputOptions, add_model_flags, build_extractor, run_cli
from .flags import add_config_flags, config_from_args, make_parser


@dataclass(frozen=True)
class ExtractOptions:
    """densevit-extract's own flags (what to read and write besides :class:`ExtractionConfig`)."""

    images: Tuple[str, ...] = opt((), "image files and/or folders of images", positional=True, nargs="*")
    store: Optional[str] = opt(None, "feature store folder: raw descriptors of every image in safetensors shards "
                                     "with a manifest; rerunning the same command finishes what is missing, another "
                                     "image list adds its images (the stored ones are kept); one writer at a time; "
                                     "run under `torchrun --nproc_per_node N` for N processes")
    recursive: bool = opt(False, "also take images in sub-folders of folder inputs", negatable=False)
    stats: Optional[str] = opt(None, "write the run's timing report (images, decode/forward/write/wait seconds per "
                                     "rank) to this JSON file")
    bin: bool = opt(False, "log-binned descriptors (17 bins)", negatable=False)
    include_cls: bool = opt(False, "keep the CLS token as the first descriptor", negatable=False)
    list_backbones: bool = opt(False, "list the known backbones and exit", negatable=False)
    max_output_mib: int = opt(DEFAULT_MAX_OUTPUT_MIB, "largest .npz file written, in MiB (estimated from the image "
                                                      "headers before any work; 0: no bound)")


_DATASET = ("store", "prune", "batch_size", "workers", "writers", "store_dtype", "shard_size", "fast_decode",
            "recursive", "content_hash", "stats")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("densevit-extract", __doc__)
    add_config_flags(p, ExtractOptions, only=["images"])
    add_config_flags(p, OutputOptions, only=["out"], tweak={"out": {
        "required": False, "help": "output folder (one <image-stem>.npz per image)"}})
    add_model_flags(p)
    add_config_flags(p, ExtractionConfig, only=["load_size", "layers", "facets"], title="descriptors")
    d = p.add_argument_group("dataset mode (a feature store instead of .npz files)")
    for cls in (ExtractOptions, ExtractionConfig):
        add_config_flags(d, cls, only=[n for n in _DATASET if n in cls.__dataclass_fields__])
    add_config_flags(d, OutputOptions, only=["quiet"])
    add_config_flags(p, ExtractionConfig, only=["saliency"])
    add_config_flags(p, ExtractOptions, only=["bin", "include_cls", "max_output_mib"])
    add_config_flags(p, OutputOptions, only=["overwrite"], tweak={"overwrite": {
        "help": "replace existing output files (with --store: empty the store first)"}})
    add_config_flags(p, UpsampleOptions, title="pixel-dense features (.npz files; a store keeps raw maps)")
    add_config_flags(p, ExtractOptions, only=["list_backbones"])
    return p


def _flatten_attn(a: np.ndarray) -> np.ndarray:
    """``heads x T x T`` attention -> ``T x (T*heads)`` descriptors, head-minor as the reference."""
    return a.transpose(1, 2, 0).reshape(a.shape[1], -1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_backbones:
        wide = max(map(len, BACKBONES)), max(len(s.hub_name) for s in BACKBONES.values())
        for name, spec in BACKBONES.items():
            print(f"{name:{wide[0]}s}  {spec.hub_name:{wide[1]}s} patch {spec.patch_size:2d}  {spec.supervision:10s} "
                  f"{spec.pos.describe()}")
        return 0
    up = config_from_args(UpsampleOptions, args)
    if args.store and args.upsample_weights and not up.upsample:
        up.options()                                    # --upsample-weights without --upsample: refused
    if args.store:
        if up.upsample:
            raise DensevitError("a store keeps the raw patch-stride maps; upsample them when reading "
                                "(e.g. densevit-coseg --store S --upsample jbu); drop --upsample")
        return _store_main(args)
    if up.upsample and (args.include_cls or args.facets == ("attn",)):
        raise DensevitError("--upsample gives pixel maps of patch descriptors: not with --include-cls or attn")
    if args.prune:
        raise DensevitError("--prune applies to a feature store (--store DIR)")
    if not args.images or not args.out:
        raise DensevitError("give at least one image and an output folder (-o OUT), or a feature store (--store DIR)")
    if len(args.layers) != 1 or len(args.facets) != 1:
        raise DensevitError("several layers or facets need a feature store (--store DIR); .npz files hold one")
    layer, facet = args.layers[0], args.facets[0]
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
    if args.max_output_mib < 0:
        raise DensevitError(f"--max-output-mib must be >= 0 (0: no bound), got {args.max_output_mib}")
    check_output_bytes(((str(img), _npz_bytes(img, args, facet, up.upsample)) for img, _ in todo),
                       args.max_output_mib, "--max-output-mib")
    up_options = up.options()       # AnyUp's weights found and read once, before the model loads
    ext = build_extractor(args)
    ext.resolve_layer(layer)  # validate before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = provenance_fields(ext.provenance)      # backbone, weights (file name or random), weights_sha256
    failures = written = 0
    unreadable = []
    for img, target in tqdm(todo, desc="extract", unit="img", disable=args.quiet or len(todo) < 2):
        try:
            x, grid = ext.preprocess(img, args.load_size)
            feats = ext.extract(x, (layer,), (facet,), bin=args.bin, include_cls=args.include_cls,
                                saliency=args.saliency, image_hw=grid.image_hw, upsample=up.upsample,
                                upsample_options=up_options)
            grid = feats.grid
        except UnreadableImageError as exc:
            skip_unreadable("densevit-extract", exc)
            unreadable.append(img)
            continue
        except DensevitError as exc:
            tqdm.write(f"densevit-extract: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        desc = feats.descriptors[(layer, facet)][0].float().cpu().numpy()
        if facet == "attn":
            desc = _flatten_attn(desc)
        arrays = dict(descriptors=desc, num_patches=np.array(grid.shape), input_hw=np.array(grid.input_hw),
                      image_hw=np.array(grid.original_hw), stride=np.array(grid.stride),
                      patch_size=np.array(grid.patch_size), layer=np.array(layer), facet=np.array(facet),
                      binned=np.array(args.bin), **{k: np.array(v) for k, v in provenance.items()})
        if up.upsample:     # one token per input pixel: stride and patch size 1, extracted at extraction_stride
            arrays.update(upsample=np.array(up.upsample), extraction_stride=np.array(ext.stride))
        if feats.saliency is not None:
            arrays["saliency"] = feats.saliency[0].float().cpu().numpy()
        atomic_write(target, lambda f: np.savez(f, **arrays))
        written += 1
    print(f"densevit-extract: {written} descriptor file(s) written to {out_dir}"
          + (f", {skipped} existing kept" if skipped else "") + (f", {failures} failed" if failures else ""))
    return max(1 if failures else 0, report_unreadable("densevit-extract", unreadable))


def _npz_bytes(image: Path, args: argparse.Namespace, facet: str, upsample: Optional[str]) -> int:
    """The size of ``image``'s .npz (float32 descriptors and saliency), from its header and the flags; 0 when the
    header cannot be read (the image is skipped later, in its one line)."""
    from ..cli.common import resolve_stride
    from ..models.grid import grid_shape
    from ..models.registry import get_spec

    spec = get_spec(args.backbone)
    try:
        H, W = resized_hw(image_size(image), args.load_size if args.load_size and args.load_size > 0 else None)
        h, w = grid_shape((H, W), spec.patch_size, resolve_stride(args))
    except DensevitError:
        return 0
    tokens = H * W if upsample else h * w + (1 if args.include_cls else 0)
    dim = tokens * spec.num_heads if facet == "attn" else spec.embed_dim * (17 if args.bin else 1)
    return 4 * tokens * (dim + (1 if args.saliency else 0))


def _store_main(args: argparse.Namespace) -> int:
    """Dataset mode: every rank (one process, or each one torchrun started) runs this."""
    from ..runtime import dist
    from ..storage.extract import extract_to_store, gather_dataset

    if not args.images:
        raise DensevitError("give images or folders to extract into the store")
    if args.bin or args.include_cls:
        raise DensevitError("a store keeps raw descriptors (bin at read time: FeatureStore.descriptors(..., bin=True))"
                            " and always the CLS descriptor; drop --bin / --include-cls")
    if args.batch_size < 1 or args.workers < 0 or args.shard_size < 1 or args.writers < 1:
        raise DensevitError("--batch-size, --shard-size and --writers must be >= 1, --workers >= 0")
    from ..storage.store import check_store_outputs, check_unlocked

    # before any model loads: the store (and its internals) never in the inputs, --stats never an input nor
    # inside the store (it would replace its manifest), every place writable, and no other writer at work
    check_store_outputs(args.store, args.images)
    if args.stats:
        check_outputs([*args.images, args.store], files=[args.stats], overwrite=True)
    with dist.session() as ctx:
        ctx.on_main(lambda: check_unlocked(args.store))
        items = gather_dataset(args.images, args.recursive)
        args.device = ctx.device(args.device)
        ext = build_extractor(args)
        for l in args.layers:
            ext.resolve_layer(l)
        cfg = config_from_args(ExtractionConfig, args, overwrite=args.overwrite, progress=not args.quiet)
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

            atomic_write_text(args.stats, json.dumps(
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
