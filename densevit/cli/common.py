"""What every densevit command-line tool shares: error handling, extractor flags, input gathering."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from ..errors import DensevitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def run_cli(main: Callable[[Optional[Sequence[str]]], int], prog: str) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a CLI ``main(argv) -> exit code`` so user errors print one line and exit 2, never a traceback."""

    def entry(argv: Optional[Sequence[str]] = None) -> int:
        try:
            code = main(argv)
        except DensevitError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            code = 130
        if argv is None:
            sys.exit(code)
        return code

    return entry


def add_backbone_args(parser: argparse.ArgumentParser, *, stride: Optional[int] = 4, load_size: Optional[int] = 224,
                      layer: Optional[int] = 11, facet: Optional[str] = "key") -> None:
    """Add the flags that choose and configure the extractor (backbone, weights, stride, device, dtype...)."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--backbone", default="dino_vits8", help="backbone name (see `densevit-extract --list-backbones`)")
    g.add_argument("--weights", default=None,
                   help="weights: a checkpoint file, 'random', or unset to search $DENSEVIT_WEIGHTS then the timm hub")
    g.add_argument("--stride", type=int, default=stride, help="patch-embedding stride (must divide the patch size)")
    if load_size is not None:
        g.add_argument("--load-size", type=int, default=load_size, help="resize the shorter image side to this")
    if layer is not None:
        g.add_argument("--layer", type=int, default=layer, help="block index, 0-based (-1 = last)")
    if facet is not None:
        from ..extractor import FACETS

        g.add_argument("--facet", default=facet, choices=list(FACETS),
                       help="key/query: before RoPE on rotary backbones (key_rope/query_rope: after it)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def build_extractor(args: argparse.Namespace):
    """Build a ViTExtractor from the flags added by :func:`add_backbone_args`."""
    from ..extractor import ViTExtractor

    return ViTExtractor(args.backbone, stride=args.stride, weights=args.weights, device=args.device, dtype=args.dtype)


def gather_images(inputs: Iterable[str]) -> List[Path]:
    """Expand files and folders (non-recursive, sorted) into a list of image paths; missing paths are errors."""
    out: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DensevitError(f"no images found in folder {p}")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DensevitError(f"no such file or folder: {p}")
    if not out:
        raise DensevitError("no input images given")
    return out


def gather_sets(inputs: Sequence[str]) -> List[tuple[str, List[Path]]]:
    """Inputs -> named image sets: a folder whose sub-folders hold images is a folder of sets (one per
    sub-folder, as the reference tools take); otherwise all files/folders given form one set."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        root = Path(inputs[0])
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        if subdirs:
            return [(d.name, sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
                    for d in subdirs]
        return [(root.name, gather_images(inputs))]
    return [("set", gather_images(inputs))]


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise DensevitError(f"{path} exists; pass --overwrite to replace it")
