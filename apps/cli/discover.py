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

from densevit.cli.common import (
    WritesIntoInputsError,
    add_backbone_args,
    build_extractor,
    check_outputs,
    gather_images,
    report_unreadable,
    run_cli,
    skip_unreadable,
)
from densevit.errors import DensevitError
from densevit.io.images import UnreadableImageError

from .. import draw
from ..discovery.core import FITS, METHODS, REFINES, SOLVERS, DiscoverConfig, discover
from .common import load_size_arg, stems

PROG = "densevit-discover"
MAP_NAME = {"tokencut": "eigvec", "lost": "degree"}


def add_discover_args(parser: argparse.ArgumentParser, prefix: str = "", load_size: int = 0,
                      method: bool = True) -> None:
    """Flags of :class:`DiscoverConfig` (defaults: the papers'); ``prefix`` (e.g. ``"discover-"``) names them
    apart from another tool's flags; ``method=False`` leaves out ``--method``."""
    d = DiscoverConfig()
    g = parser.add_argument_group("object discovery (defaults: the papers')")
    if method:
        g.add_argument(f"--{prefix}method", default=d.method, choices=METHODS, help="TokenCut or LOST")
    g.add_argument(f"--{prefix}load-size", type=int, default=load_size,
                   help="resize the shorter image side to this (0: the original size, as the papers"
                        + ("; -1: the propagation's --short-side)" if load_size < 0 else ")"))
    g.add_argument(f"--{prefix}fit", default=d.fit, choices=FITS,
                   help="grid fitting: pad to a multiple of the patch (papers), round each side to one "
                        "(TokenCut's saliency script), or crop the last partial patch")
    g.add_argument(f"--{prefix}tau", type=float, default=d.tau, help="TokenCut graph threshold")
    g.add_argument(f"--{prefix}eps", type=float, default=d.eps, help="TokenCut weight of edges below tau")
    g.add_argument(f"--{prefix}no-binary-graph", action="store_true",
                   help="TokenCut ablation: similarities as edge weights above tau instead of 1")
    g.add_argument(f"--{prefix}solver", default=d.solver, choices=SOLVERS,
                   help="eigh: symmetric-normalised standard problem (default); generalized: TokenCut's "
                        "eigh(D - W, D) call with a dense D (same vector, slower)")
    g.add_argument(f"--{prefix}k-patches", type=int, default=d.k_patches,
                   help="LOST: lowest-degree patches considered in the seed expansion")
    g.add_argument(f"--{prefix}refine", default=d.refine, choices=REFINES,
                   help="mask refinement: none, a dense CRF (pydensecrf when installed, else approximate), or "
                        "TokenCut's bilateral solver (at the original resolution)")
    g.add_argument(f"--{prefix}sigma-spatial", type=float, default=d.sigma_spatial, help="bilateral solver")
    g.add_argument(f"--{prefix}sigma-luma", type=float, default=d.sigma_luma, help="bilateral solver")
    g.add_argument(f"--{prefix}sigma-chroma", type=float, default=d.sigma_chroma, help="bilateral solver")
    g.add_argument(f"--{prefix}max-tokens", type=int, default=d.max_tokens,
                   help="refuse larger token grids (the graph is dense T x T)")


def config_from_args(args: argparse.Namespace, prefix: str = "", layer: Optional[int] = None,
                     facet: Optional[str] = None) -> DiscoverConfig:
    """:class:`DiscoverConfig` from the flags of :func:`add_discover_args` (and --layer / --facet)."""
    a = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix.replace("-", "_"))} \
        if prefix else vars(args)
    cfg = DiscoverConfig(method=a.get("method", DiscoverConfig.method), load_size=load_size_arg(a["load_size"]), fit=a["fit"],
                         layer=args.layer if layer is None else layer, facet=args.facet if facet is None else facet,
                         tau=a["tau"], eps=a["eps"], binary_graph=not a["no_binary_graph"], solver=a["solver"],
                         k_patches=a["k_patches"], refine=a["refine"], max_tokens=a["max_tokens"],
                         sigma_spatial=a["sigma_spatial"], sigma_luma=a["sigma_luma"],
                         sigma_chroma=a["sigma_chroma"])
    cfg.validate()
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Discover the main object of each image without labels "
                                "(TokenCut normalized cut or LOST seed expansion on ViT keys).")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-side", type=int, default=1024,
                   help="longest side of the pictures in pixels (masks keep the original size)")
    add_discover_args(p)
    add_backbone_args(p, stride=None, load_size=None, layer=-1, facet="key")
    p.set_defaults(backbone="dino_vits16")
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
    bar = tqdm(list(zip(images, names)), desc=PROG, unit="image", disable=args.quiet or None, file=sys.stderr)
    for path, stem in bar:
        bar.set_postfix_str(stem)
        try:
            targets = {k: out / f"{stem}_{k}.png" for k in kinds}
            check_outputs(args.inputs, files=targets.values(), overwrite=args.overwrite)
            t0 = time.perf_counter()
            r = discover(ext, path, cfg)
            draw.save_mask(targets["mask"], r.mask)
            draw.save_rgb(targets["overlay"], draw.discovery_overlay(r.image, r.mask, r.box, r.seed_xy,
                                                                     max_side=args.max_side))
            draw.save_rgb(targets[MAP_NAME[cfg.method]], draw.heatmap_overlay(r.image, r.score_map(),
                                                                              max_side=args.max_side))
            seconds = time.perf_counter() - t0
            records[stem] = {"file": str(path), "image_hw": list(r.features.image_hw),
                             "grid_hw": list(r.features.grid.shape), "box_xyxy": [round(c, 2) for c in r.box],
                             "seed_xy": [round(c, 2) for c in r.seed_xy], "seed_token": r.tokens.seed,
                             "foreground_fraction": round(float(r.mask.mean()), 5), "refined": r.refined,
                             "seconds": round(seconds, 3)}
            x0, y0, x1, y1 = r.box
            tqdm.write(f"{stem}: {cfg.method} box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}), foreground "
                       f"{100 * r.mask.mean():.1f}% [{seconds:.1f} s]", file=sys.stdout)
        except WritesIntoInputsError:
            raise
        except UnreadableImageError as exc:
            unreadable.append(path)
            skip_unreadable(PROG, exc)
        except DensevitError as exc:
            failures += 1
            tqdm.write(f"{PROG}: {path}: error: {exc}", file=sys.stderr)
    bar.close()
    settings = {"backbone": args.backbone, "weights": args.weights, "stride": ext.stride,
                **{k: v for k, v in vars(cfg).items()}}
    boxes_path.write_text(json.dumps({"settings": settings, "images": records}, indent=2) + "\n")
    if failures:
        print(f"{PROG}: {failures} input(s) failed; {len(records)} image(s) written to {out}", file=sys.stderr)
    return max(1 if failures else 0, report_unreadable(PROG, unreadable))


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
