"""densevit-extract: write dense descriptors (and saliency) of images to .npz files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..backbones import BACKBONES
from ..errors import DensevitError
from .common import add_backbone_args, build_extractor, gather_images, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densevit-extract", description=__doc__)
    p.add_argument("images", nargs="*", help="image files and/or folders of images")
    p.add_argument("-o", "--out", help="output folder (one <image-stem>.npz per image)")
    add_backbone_args(p)
    p.add_argument("--bin", action="store_true", help="log-binned descriptors (17 bins)")
    p.add_argument("--saliency", action="store_true", help="also write the CLS-attention saliency map")
    p.add_argument("--include-cls", action="store_true", help="keep the CLS token as the first descriptor")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
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
    if not args.images or not args.out:
        raise DensevitError("give at least one image and an output folder (-o OUT)")
    images = gather_images(args.images)
    out_dir = Path(args.out)
    targets = [out_dir / f"{img.stem}.npz" for img in images]
    if len(set(targets)) != len(targets):
        raise DensevitError("two inputs share a file name stem; extract them into separate output folders")
    todo = [(img, t) for img, t in zip(images, targets) if args.overwrite or not t.exists()]
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
    for img, target in tqdm(todo, desc="extract", unit="img", disable=len(todo) < 2):
        try:
            x, grid = ext.preprocess(img, args.load_size)
            feats = ext.extract(x, (layer,), (args.facet,), bin=args.bin, include_cls=args.include_cls,
                                saliency=args.saliency, image_hw=grid.image_hw)
        except DensevitError as exc:
            print(f"densevit-extract: error: {exc}", file=sys.stderr)
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
    return 1 if failures else 0


entry = run_cli(main, "densevit-extract")

if __name__ == "__main__":
    entry()
