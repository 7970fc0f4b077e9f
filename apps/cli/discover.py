"""densevit-discover: find the main object of each image without labels (TokenCut or LOST).

    densevit-discover IMAGES... | FOLDER  --out DIR [--method tokencut|lost] [--refine none|crf|bilateral] [--overwrite]

Per image: ``<stem>_mask.png`` (original size, 0/255), ``<stem>_overlay.png`` (background faded, mask outline in
red, object box in yellow, seed in blue) and ``<stem>_eigvec.png`` (TokenCut's second eigenvector) or
``<stem>_degree.png`` (LOST's inverse degree) coloured over the image; ``boxes.json`` with every image's box,
seed and settings. An unreadable image is reported in one line and skipped; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from densevit.cli import flags
from densevit.cli.common import OutputOptions, add_model_flags, build_extractor, run_cli
from densevit.cli.flags import add_config_flags, make_parser
from densevit.errors import DensevitError
from densevit.io.files import OutputWriteError, WritesIntoInputsError, atomic_write_text, check_outputs
from densevit.io.images import UnreadableImageError, gather_images, report_unreadable, skip_unreadable
from densevit.runtime.progress import Progress

from .. import draw
from ..discovery.core import DiscoverConfig, discover
from .common import SetsIO, stems

PROG = "densevit-discover"
MAP_NAME = {"tokencut": "eigvec", "lost": "degree"}
MAP_TITLE = {"tokencut": "TokenCut: second smallest eigenvector", "lost": "LOST: inverse degree"}


def add_discover_args(parser: argparse.ArgumentParser, prefix: str = "", load_size: int = 0,
                      method: bool = True) -> None:
    """Flags of :class:`DiscoverConfig` (defaults: the papers'); ``prefix`` (e.g. ``"discover-"``) names them
    apart from another tool's flags (and leaves out --layer/--facet: the last block's keys); ``method=False``
    leaves out ``--method``; ``load_size`` -1: the propagation's --load-size."""
    skip = (() if method else ("method",)) + (("layer", "facet") if prefix else ())
    help_load = "resize the shorter image side to this (0: the original size, as the papers" + (
        "; -1: the propagation's --load-size)" if load_size < 0 else ")")
    add_config_flags(parser, DiscoverConfig, title="object discovery (defaults: the papers')", prefix=prefix,
                     skip=skip, defaults={"load_size": load_size}, tweak={"load_size": {"help": help_load}, "upsample": {"help": (
                         "discover on features upsampled with this method, guided by the image, to the densest grid "
                         "of patch/f-pixel cells within --max-tokens (f divides the patch)")}})


def config_from_args(args: argparse.Namespace, prefix: str = "", layer: Optional[int] = None,
                     facet: Optional[str] = None) -> DiscoverConfig:
    """:class:`DiscoverConfig` from the flags of :func:`add_discover_args` (``layer``/``facet`` override)."""
    fixed = {k: v for k, v in (("layer", layer), ("facet", facet)) if v is not None}
    cfg = flags.config_from_args(DiscoverConfig, args, prefix=prefix, **fixed)
    cfg.validate()
    cfg.options()               # --upsample-weights checked, AnyUp's weights read once, before any work
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Discover the main object of each image without labels (TokenCut normalized cut or "
                    "LOST seed expansion on ViT keys).")
    add_config_flags(p, SetsIO, only=["inputs"], tweak={"inputs": {"help": "image files or folders of images"}})
    add_config_flags(p, OutputOptions)
    add_config_flags(p, SetsIO, only=["max_side"],
                     tweak={"max_side": {"help": "longest side of the pictures in pixels (masks keep the original "
                                                 "size)"}})
    add_discover_args(p)
    add_model_flags(p, stride="patch")
    return p


def _gather(inputs: Sequence[str]) -> tuple[List[Path], List[str]]:
    """Images of every input; inputs that are missing or hold no image become error lines (not fatal)."""
    images, errors = [], []
    for item in inputs:
        try:
            images.extend(gather_images([item]))
        except DensevitError as exc:
            errors.append(str(exc))
    return images, errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    images, errors = _gather(args.inputs)
    for e in errors:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    if not images:
        raise DensevitError("no input images")
    out = Path(args.out)
    names = stems(images)
    kinds = ("mask", "overlay", MAP_NAME[cfg.method])
    boxes_path = out / "boxes.json"
    check_outputs(args.inputs, folders=[out], files=[boxes_path], overwrite=args.overwrite)
    ext = build_extractor(args)
    ext.resolve_layer(cfg.layer)
    out.mkdir(parents=True, exist_ok=True)

    records: Dict[str, Dict] = {}
    failures = len(errors)
    unreadable: List[Path] = []
    progress = Progress(PROG, quiet=args.quiet)
    provenance = ext.provenance
    for path, stem in progress.track(list(zip(images, names)), "discovering", "image", leave=True):
        try:
            targets = {k: out / f"{stem}_{k}.png" for k in kinds}
            check_outputs(args.inputs, files=targets.values(), overwrite=args.overwrite)
            t0 = time.perf_counter()
            r = discover(ext, path, cfg)
            draw.save_mask(targets["mask"], r.mask)
            draw.save_rgb(targets["overlay"], draw.discovery_overlay(r.image, r.mask, r.box, r.seed_xy,
                                                                     max_side=args.max_side))
            draw.save_rgb(targets[MAP_NAME[cfg.method]], draw.heatmap_overlay(
                r.image, r.score_map(), max_side=args.max_side, title=MAP_TITLE[cfg.method]))
            seconds = time.perf_counter() - t0
            records[stem] = {"file": str(path), "image_hw": list(r.features.image_hw),
                             "grid_hw": list(r.features.grid.shape), "box_xyxy": [round(c, 2) for c in r.box],
                             "seed_xy": [round(c, 2) for c in r.seed_xy], "seed_token": r.tokens.seed,
                             "foreground_fraction": round(float(r.mask.mean()), 5), "refined": r.refined,
                             "seconds": round(seconds, 3)}
            x0, y0, x1, y1 = r.box
            tqdm.write(f"{stem}: {cfg.method} box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}), foreground "
                       f"{100 * r.mask.mean():.1f}% [{seconds:.1f} s]", file=sys.stdout)
        except (WritesIntoInputsError, OutputWriteError):      # a full disk stops the run, in one line
            raise
        except UnreadableImageError as exc:
            unreadable.append(path)
            skip_unreadable(PROG, exc)
        except DensevitError as exc:
            failures += 1
            tqdm.write(f"{PROG}: {path}: error: {exc}", file=sys.stderr)
    settings = {"backbone": ext.spec.name, "weights": args.weights, "stride": ext.stride,
                **{k: v for k, v in vars(cfg).items()}}
    if records:                 # nothing discovered: no boxes.json (an empty one would read as a result)
        atomic_write_text(boxes_path, json.dumps({"provenance": provenance, "settings": settings, "images": records},
                                                 indent=2) + "\n")
    if failures:
        print(f"{PROG}: {failures} input(s) failed; {len(records)} image(s) written to {out}", file=sys.stderr)
    return max(1 if failures else 0, report_unreadable(PROG, unreadable))


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
