"""densevit-pca: look at dense descriptors as colours (PCA of the descriptors shown as RGB).

    densevit-pca IMAGES... | FOLDER | FOLDER_OF_SETS  --out DIR [--n-components 4] [--per-image]

Per image ``<stem>_pca.png``: three principal components (default: the last three of four, as the reference)
min-max scaled to RGB, one colour per token, at the image's size (fit to --max-side); per set ``summary.json``
(explained variance) and one summary line on stdout. The PCA is fitted on all images of a set together unless
``--per-image``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from densevit.cli.common import add_backbone_args, add_store_arg, build_source, gather_sets, run_cli
from densevit.errors import DensevitError

from .. import draw
from ..common import extract_set
from ..pca import pca_features
from .common import add_io_args, load_size_arg, run_sets, stems

PROG = "densevit-pca"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Show ViT descriptors as RGB: a PCA of the descriptors "
                                "of each set of images.")
    add_io_args(p)
    g = p.add_argument_group("PCA")
    g.add_argument("--n-components", type=int, default=4, help="principal components to fit")
    g.add_argument("--rgb", type=int, nargs=3, default=None, metavar="I",
                   help="components shown as R G B (0-based; default: the last three)")
    g.add_argument("--per-image", action="store_true", help="fit one PCA per image instead of one per set")
    g.add_argument("--bin", action=argparse.BooleanOptionalAction, default=False, help="log-binned descriptors")
    add_backbone_args(p, stride=4, load_size=224, layer=11, facet="key")
    add_store_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_components < 1:
        raise DensevitError(f"--n-components must be >= 1, got {args.n_components}")
    rgb = tuple(args.rgb) if args.rgb else (-3, -2, -1)
    if args.rgb and any(not 0 <= i < args.n_components for i in args.rgb):
        raise DensevitError(f"--rgb components must lie in 0..{args.n_components - 1}")
    load_size = load_size_arg(args.load_size)
    sets = gather_sets(args.inputs)
    source = build_source(args)

    def features(images: List[Path]):
        """(descriptors, grids, names) of a set: one forward pass per image, or read from the store."""
        feats = extract_set(source, images, load_size, args.layer, args.facet, args.bin, saliency=False)
        return [f.descriptors for f in feats], [f.grid for f in feats], [f.name for f in feats]

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        return [out / f"{s}_pca.png" for s in stems(images)]

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        t = time.perf_counter()
        descriptors, grids, names = features(images)
        t_extract = time.perf_counter() - t
        t = time.perf_counter()
        res = pca_features(descriptors, grids, names, args.n_components, all_together=not args.per_image)
        t_pca = time.perf_counter() - t
        t = time.perf_counter()
        for stem, r in zip(stems(images), res):
            draw.save_rgb(out / f"{stem}_pca.png", draw.pca_rgb(r.components, r.grid, rgb, max_side=args.max_side))
        t_draw = time.perf_counter() - t
        ev = res[0].explained
        line = f"{len(images)} image(s), {args.n_components} components" + (
            "" if args.per_image else ", explained variance " + " / ".join(f"{100 * v:.1f}%" for v in ev))
        return line, {"n_components": args.n_components, "rgb": list(rgb), "per_image": args.per_image,
                      "explained_variance_ratio": {r.name: [round(float(v), 5) for v in r.explained] for r in res},
                      "timings": {"extraction": round(t_extract, 3), "pca": round(t_pca, 3),
                                  "drawing": round(t_draw, 3)}}

    return run_sets(PROG, args, sets, planned, process, min_images=1)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
