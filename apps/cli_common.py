"""What the application CLIs share: set gathering, per-set output folders, refusing to overwrite, the progress
bar over sets, one summary line per set, and per-set error reporting (a bad set never stops the others)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from densevit.cli.common import ensure_writable
from densevit.errors import DensevitError

# process(name, images, out_dir) -> (summary line, summary dict written as summary.json)
Process = Callable[[str, List[Path], Path], Tuple[str, Dict]]
Planned = Callable[[str, List[Path], Path], List[Path]]


def add_io_args(parser: argparse.ArgumentParser) -> None:
    """Positional inputs, --out, --overwrite, --quiet, --max-side."""
    parser.add_argument("inputs", nargs="+",
                        help="image files, a folder of images, or a folder of sets (one sub-folder per set)")
    parser.add_argument("-o", "--out", required=True, help="output folder (one sub-folder per set for a folder "
                        "of sets)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="longest side of the overlay pictures in pixels (raw masks keep the original size)")


def load_size_arg(value: int) -> Optional[int]:
    """``--load-size`` 0 (or less) means: keep the original size."""
    return None if value is None or value <= 0 else int(value)


def is_folder_of_sets(inputs: Sequence[str]) -> bool:
    """The rule of :func:`densevit.cli.common.gather_sets`: one folder holding sub-folders."""
    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        return False
    return any(d.is_dir() for d in Path(inputs[0]).iterdir())


def run_sets(prog: str, args: argparse.Namespace, sets: List[Tuple[str, List[Path]]], planned: Planned,
             process: Process, min_images: int = 2, max_images: Optional[int] = None) -> int:
    """Run ``process`` on every set (from :func:`densevit.cli.common.gather_sets`); returns the exit code
    (1 if any set failed, else 0).

    Per set: too few / many images, an existing output (without --overwrite) or a
    :class:`~densevit.errors.DensevitError` while processing (e.g. an unreadable image) prints
    ``prog: set NAME: error: message`` and the next set runs. ``summary.json`` is written beside the outputs.
    """
    nested = is_folder_of_sets(args.inputs)
    out_root = Path(args.out)
    failures = 0
    bar = tqdm(sets, desc=prog, unit="set", disable=args.quiet or None, file=sys.stderr)
    for name, images in bar:
        bar.set_postfix_str(name)
        out_dir = out_root / name if nested else out_root
        try:
            if len(images) < min_images:
                raise DensevitError(f"needs at least {min_images} image{'s' if min_images > 1 else ''}, "
                                    f"found {len(images)}")
            if max_images is not None and len(images) > max_images:
                raise DensevitError(f"needs exactly {max_images} images, found {len(images)}")
            targets = planned(name, images, out_dir) + [out_dir / "summary.json"]
            for t in targets:
                ensure_writable(t, args.overwrite)
            out_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            line, summary = process(name, images, out_dir)
            summary = {"set": name, "images": [str(p) for p in images], **summary,
                       "seconds": round(time.perf_counter() - t0, 3)}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            tqdm.write(f"{name}: {line} [{summary['seconds']:.1f} s]", file=sys.stdout)
        except DensevitError as exc:
            failures += 1
            tqdm.write(f"{prog}: set {name}: error: {exc}", file=sys.stderr)
    bar.close()
    if failures:
        print(f"{prog}: {failures} of {len(sets)} set(s) failed", file=sys.stderr)
    return 1 if failures else 0


def stems(images: Sequence[Path]) -> List[str]:
    """Output name stems of a set's images (prefixed by their index when two share a stem)."""
    names = [p.stem for p in images]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names
