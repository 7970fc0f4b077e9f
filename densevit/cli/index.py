"""densevit-index: search every location of a whole image collection (a patch index over a feature store).

    densevit-index build STORE -o INDEX [--kind flat|ivf-flat|ivf-pq|hnsw] [--salient-only] [--sample-stride K]
    torchrun --nproc_per_node N -m densevit.cli.index build STORE -o INDEX --on-disk
    densevit-index update INDEX [--prune]
    densevit-index search INDEX --image IMG --point X,Y [--point X,Y ...] | --box X0,Y0,X1,Y1 [-k 20] --out DIR

``build`` indexes every selected token of the store (see :mod:`densevit.storage.patch_index`); with ``--on-disk``
(implied under torchrun) the inverted lists live on disk, encoded in parts by every rank and merged
(:mod:`densevit.storage.index_ondisk`); rerunning a killed build resumes it. ``update`` adds to an on-disk index
the images its store gained, and with ``--prune`` removes those the store pruned. ``search`` writes
``DIR/<stem>_matches.json`` (per query: image, x, y in original-image pixels, token row / column, similarity)
and a contact sheet per query, ``DIR/<stem>_q<i>.png``: a crop around the query location, then one around
each of the best :data:`SHEET_MATCHES` matches, the location marked. ``-k`` lies in ``1..MAX_K``
(:data:`densevit.storage.patch_index.MAX_K`). An index opens only with the store content it was built from.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from densevit.apps import draw
from densevit.errors import DensevitError
from densevit.io.files import atomic_write_text, check_outputs
from densevit.io.images import UnreadableImageError, load_image, report_unreadable, skip_unreadable
from densevit.options import opt
from densevit.runtime import dist
from densevit.runtime.progress import Progress, reporting
from densevit.storage import index_ondisk
from densevit.storage import patch_index as pi

from .common import OutputOptions, run_cli
from .flags import HelpFormatter, add_config_flags, config_from_args, make_parser

PROG = "densevit-index"
SHEET_MATCHES = 50      # matches drawn on a contact sheet at most (the JSON holds all k)


def _pair(text: str, n: int, what: str) -> Tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


@dataclass(frozen=True)
class SearchOptions:
    """One search: the index, the query image and its point(s) or box, how many matches, where to write."""

    index: Optional[str] = opt(None, "index folder (densevit-index build)", positional=True)
    image: Optional[str] = opt(None, "query image: a stored image's key or path, or any image (extracted with the "
                                     "store's settings; needs --weights)", required=True)
    point: Optional[Tuple[float, float]] = opt(None, "X,Y in original-image pixels (repeatable)", action="append",
                                               type=lambda t: _pair(t, 2, "--point"), nargs=None)
    box: Optional[Tuple[float, float, float, float]] = opt(
        None, "X0,Y0,X1,Y1: one query from the mean descriptor of the box", type=lambda t: _pair(t, 4, "--box"),
        nargs=None)
    k: int = opt(20, f"matches per query (1..{pi.MAX_K}; the contact sheet shows the best {SHEET_MATCHES})",
                 flag="-k")
    store: Optional[str] = opt(None, "the feature store (default: the one the index was built from)")
    weights: Optional[str] = opt(None, "weights to extract a query image that is not in the store")
    nprobe: Optional[int] = opt(None, "IVF lists visited (default: the index's)")
    rerank: Optional[int] = opt(None, "ivf-pq candidates re-scored (default: the index's)")
    device: Optional[str] = opt(None, "cpu or cuda (default: cuda when available)")
    crop: Optional[float] = opt(None, "contact-sheet crop side in original pixels (default: 12 tokens)")


@dataclass(frozen=True)
class UpdateOptions:
    """One update of an on-disk index: the index, its store, whether to remove what the store pruned."""

    index: Optional[str] = opt(None, "index folder (densevit-index build --on-disk)", positional=True)
    store: Optional[str] = opt(None, "the feature store (default: the one the index was built from)")
    prune: bool = opt(False, "remove the images the store no longer holds", negatable=False)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "A patch index over a feature store: build it, search it.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index every token of a feature store", formatter_class=HelpFormatter)
    b.add_argument("store", help="feature store folder (densevit-extract --store)")
    add_config_flags(b, OutputOptions, only=["out"], tweak={"out": {"help": "index folder to write"}})
    add_config_flags(b, pi.IndexConfig)
    add_config_flags(b, OutputOptions, only=["overwrite", "quiet"])
    u = sub.add_parser("update", help="add the images the store gained to an --on-disk index (--prune: remove "
                                      "those it pruned)", formatter_class=HelpFormatter)
    add_config_flags(u, UpdateOptions)
    add_config_flags(u, OutputOptions, only=["quiet"])
    s = sub.add_parser("search", help="the best-matching locations of a point or box across the collection",
                       formatter_class=HelpFormatter)
    add_config_flags(s, SearchOptions, only=["index", "image", "point", "box", "k"])
    add_config_flags(s, OutputOptions, only=["out"], tweak={"out": {"help": "output folder (JSON + contact sheets)"}})
    add_config_flags(s, SearchOptions, only=["store", "weights", "nprobe", "rerank", "device", "crop"])
    add_config_flags(s, OutputOptions, only=["overwrite"])
    return p


def _build(args: argparse.Namespace, ctx: dist.DistContext) -> int:
    out = Path(args.out)
    cfg = config_from_args(pi.IndexConfig, args)
    if ctx.world_size > 1 and not cfg.on_disk:        # a sharded build merges parts into on-disk lists
        cfg.on_disk = True
    cfg.check()

    def check_out() -> None:
        check_outputs([args.store], folders=[out])
        unfinished = cfg.on_disk and (out / index_ondisk.PARTS / index_ondisk.PLAN).is_file()
        if (out.exists() and any(out.iterdir()) and not args.overwrite
                and ((out / pi.META).exists() or not unfinished)):
            raise DensevitError(f"{out} exists and is not empty; pass --overwrite to replace the index")

    # rank 0 alone judges the output folder, before it writes there; the other ranks take its verdict (looking
    # for themselves, a rank could find the folder rank 0 has just started and refuse it)
    ctx.on_main(check_out)
    t = time.perf_counter()
    with reporting(Progress(PROG, quiet=args.quiet or not ctx.is_main)):
        if cfg.on_disk:
            index = index_ondisk.build_on_disk(args.store, out, cfg, progress=not args.quiet, ctx=ctx,
                                               overwrite=args.overwrite)
        else:
            index = pi.build_index(args.store, out, cfg, progress=not args.quiet)
    if not ctx.is_main:
        return 0
    size = sum((out / n).stat().st_size for n in index.meta["files"])
    print(f"index {out}: {len(index)} vectors of {index.meta['dim']} dims from {len(index.images)} image(s), "
          f"{args.kind}{''.join(f', {k} {v}' for k, v in index.meta['params'].items())}, {size / 2**20:.1f} MiB "
          f"on disk{' (lists memory-mapped)' if cfg.on_disk else ''}, {time.perf_counter() - t:.1f} s"
          + (f" over {ctx.world_size} processes" if ctx.world_size > 1 else ""))
    return 0


def _update(args: argparse.Namespace, ctx: dist.DistContext) -> int:
    root = Path(args.index)
    try:                                              # the store it reads: never where the index is written
        recorded = json.loads((root / pi.META).read_text()).get("store")
    except (OSError, ValueError, AttributeError):
        recorded = None                               # (update_index names what is wrong with the index)
    check_outputs([s for s in (args.store or recorded,) if s], folders=[root])
    t = time.perf_counter()
    with reporting(Progress(PROG, quiet=args.quiet or not ctx.is_main)):
        done = index_ondisk.update_index(root, args.store, prune=args.prune, progress=not args.quiet, ctx=ctx)
    if ctx.is_main:
        added, removed = done
        if not added and not removed:
            print(f"index {root} is up to date with its store")
        else:
            index = pi.load_index(root, args.store)
            print(f"index {root}: {added} image(s) added, {removed} removed; {len(index)} vectors of "
                  f"{len(index.store.images)} stored image(s), {time.perf_counter() - t:.1f} s")
    return 0


def _dataset_root(store: "pi.FeatureStore", key: str) -> Path:
    """The folder a stored image was extracted from (its source path less its key)."""
    src = Path(store.source_path(key))
    parts = Path(key).parts
    return Path(*src.parts[:-len(parts)]) if src.parts[-len(parts):] == parts else src.parent


def _search(args: argparse.Namespace) -> int:
    if (args.point is None) == (args.box is None):
        raise DensevitError("give --point X,Y (one or more) or --box X0,Y0,X1,Y1")
    pi.check_k(args.k)
    out = Path(args.out)
    check_outputs([args.index, args.store], folders=[out])
    index = pi.load_index(args.index, args.store, args.device)
    if args.nprobe is not None or args.rerank is not None:
        cfg = index.config
        cfg.nprobe = cfg.nprobe if args.nprobe is None else args.nprobe      # 0 is refused, not the default
        cfg.rerank = cfg.rerank if args.rerank is None else args.rerank
        cfg.check()
        if args.nprobe is not None:
            cfg.check_nprobe(index.meta.get("params", {}).get("nlist"))
        index.meta["config"] = asdict(cfg)
    image = args.image
    extractor = None
    if image not in index.store:
        if not Path(image).is_file():
            raise DensevitError(f"query image {image} is neither in store {index.store.root} nor a file")
        from densevit.storage.extract import extractor_for_store

        extractor = extractor_for_store(index.store.settings, args.weights, args.device)
    stem = Path(image).stem
    n_queries = 1 if args.box is not None else len(args.point)
    targets = [out / f"{stem}_matches.json"] + [out / f"{stem}_q{i}.png" for i in range(n_queries)]
    t0 = time.perf_counter()
    q, grid, tokens = pi.query_descriptors(index, image, args.point, args.box, extractor)
    sims, idx = index.search_vectors(q, args.k)
    results = [index.matches(s, i) for s, i in zip(sims, idx)]
    seconds = time.perf_counter() - t0
    query_path = index.store.source_path(image) if extractor is None else image
    # the folders the drawn images are read from; a query given as a stored image's path counts by its key (its
    # path less its key would make the current folder a dataset root)
    drawn = {m.image for ms in results for m in ms[:SHEET_MATCHES]} | (
        {index.store.key(image)} if extractor is None else set())
    read = [args.index, index.store.root, query_path, *{str(_dataset_root(index.store, k)) for k in drawn}]
    check_outputs(read, folders=[out], files=targets, overwrite=args.overwrite)   # nothing read is written into
    query_img = load_image(query_path)
    out.mkdir(parents=True, exist_ok=True)
    queries = [{"point": list(p)} for p in args.point] if args.point else [{"box": list(args.box)}]
    record = {"image": image, "index": str(Path(args.index).resolve()), "k": args.k, "seconds": round(seconds, 4),
              "queries": [{**qd, "matches": [asdict(m) for m in ms]} for qd, ms in zip(queries, results)]}
    atomic_write_text(targets[0], json.dumps(record, indent=1) + "\n")
    side = args.crop or 12 * grid.stride * max(grid.scale_xy)
    cache, unreadable = {}, []
    for i, (qd, ms) in enumerate(zip(queries, results)):
        qxy = qd.get("point") or [(args.box[0] + args.box[2]) / 2, (args.box[1] + args.box[3]) / 2]
        tiles = []
        for r, m in enumerate(ms[:SHEET_MATCHES], 1):
            if m.image not in cache:
                try:
                    cache[m.image] = load_image(index.store.source_path(m.image))
                except UnreadableImageError as exc:      # the stored image's file is gone or changed since
                    cache[m.image] = None
                    unreadable.append(m.image)
                    skip_unreadable(PROG, exc)
            if cache[m.image] is not None:
                tiles.append((cache[m.image], (m.x, m.y), f"#{r} {m.similarity:.3f} {m.image[-18:]}"))
        draw.save_rgb(targets[1 + i], draw.contact_sheet(query_img, qxy, tiles, side))
    best = results[0][0] if results[0] else None
    print(f"{n_queries} quer{'y' if n_queries == 1 else 'ies'}, {args.k} matches each in {seconds * 1000:.1f} ms; "
          + (f"best: {best.image} ({best.x:.0f}, {best.y:.0f}) similarity {best.similarity:.3f}; " if best else "")
          + f"wrote {targets[0]} and {n_queries} contact sheet(s)"
          + (f" (the best {SHEET_MATCHES} matches drawn)" if args.k > SHEET_MATCHES else ""))
    return report_unreadable(PROG, unreadable)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "search":
        return _search(args)
    with dist.session() as ctx:                       # alone, or one rank of torchrun
        return (_build if args.command == "build" else _update)(args, ctx)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
