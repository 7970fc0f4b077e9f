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

from densevit.runtime.progress import stage, track
from densevit.cli.common import build_source, run_cli
from densevit.io.images import gather_sets

from .. import draw
from ..common import extract_set
from ..pca import PCAConfig, pca_features
from .common import check_sets_outputs, run_sets, sets_parser, stems, validated_config

PROG = "densevit-pca"


def build_parser() -> argparse.ArgumentParser:
    return sets_parser(PROG, "Show ViT descriptors as RGB: a PCA of the descriptors of each set of images.",
                       (PCAConfig, "PCA"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = validated_config(PCAConfig, args)
    rgb = cfg.shown
    sets = gather_sets(args.inputs)
    check_sets_outputs(args, sets)
    source = build_source(args)

    def features(images: List[Path]):
        """(descriptors, grids, names) of a set: one forward pass per image, or read from the store."""
        feats = extract_set(source, images, cfg.load_size, cfg.layer, cfg.facet, cfg.bin, saliency=False)
        return [f.descriptors for f in feats], [f.grid for f in feats], [f.name for f in feats], [f.image for f in feats]

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        return [out / f"{s}_pca.png" for s in stems(images)]

    def process(name: str, images: List[Path], out: Path) -> Tuple[str, Dict]:
        t = time.perf_counter()
        descriptors, grids, names, photos = features(images)
        t_extract = time.perf_counter() - t
        t = time.perf_counter()
        stage("PCA")
        res = pca_features(descriptors, grids, names, cfg.n_components, all_together=not cfg.per_image)
        t_pca = time.perf_counter() - t
        t = time.perf_counter()

        def caption(r) -> str:
            shown = [cfg.n_components + i if i < 0 else i for i in rgb]
            var = " / ".join(f"{100 * r.explained[i]:.1f}%" for i in shown if i < len(r.explained))
            fit = "this image" if cfg.per_image else f"{len(images)} image(s) together"
            return (f"PCA of the descriptors ({fit}): components {', '.join(str(i + 1) for i in shown)} of "
                    f"{cfg.n_components} as R, G, B (explained variance {var}); one colour per token")

        for stem, r, photo in track(list(zip(stems(images), res, photos)), "drawing"):
            token_map = draw.pca_rgb(r.components, r.grid, rgb, max_side=args.max_side)
            draw.save_rgb(out / f"{stem}_pca.png", draw.pca_panel(photo, token_map, caption(r)))
        t_draw = time.perf_counter() - t
        ev = res[0].explained
        line = f"{len(images)} image(s), {cfg.n_components} components" + (
            "" if cfg.per_image else ", explained variance " + " / ".join(f"{100 * v:.1f}%" for v in ev))
        return line, {"n_components": cfg.n_components, "rgb": list(rgb), "per_image": cfg.per_image,
                      "explained_variance_ratio": {r.name: [round(float(v), 5) for v in r.explained] for r in res},
                      "timings": {"extraction": round(t_extract, 3), "pca": round(t_pca, 3),
                                  "drawing": round(t_draw, 3)}}

    return run_sets(PROG, args, sets, planned, process, min_images=1, source=source)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
