"""What the application CLIs share: set gathering, per-set output folders, refusing to overwrite, the progress
bar over sets, one summary line per set, per-set error reporting (a bad set never stops the others) and the
one rule for unreadable inputs (:func:`drop_unreadable`: reported in one line each, left out, the rest
processed, exit code non-zero at the end)."""
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
from densevit.preprocess import load_resized

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


def check_readable(path: Path) -> None:
    """Raise :class:`DensevitError` with one line if ``path`` cannot be decoded as an image. Decodes the whole
    file (JPEGs at reduced scale, which still reads every byte), so truncated and garbage files are caught."""
    load_resized(path, 16, fast_jpeg=True)


def drop_unreadable(prog: str, images: Sequence[Path], where: str = "") -> Tuple[List[Path], List[Path]]:
    """The rule every application follows for bad inputs: each unreadable image is reported in one line
    (``prog: [where: ]skipping unreadable image: reason``) and left out. Returns ``(readable, unreadable)``;
    callers process the readable ones and exit non-zero when any were left out."""
    good: List[Path] = []
    bad: List[Path] = []
    for p in images:
        try:
            check_readable(p)
            good.append(p)
        except DensevitError as exc:
            bad.append(p)
            tqdm.write(f"{prog}: {where + ': ' if where else ''}skipping unreadable image: {exc}", file=sys.stderr)
    return good, bad


def report_unreadable(prog: str, unreadable: Sequence[Path]) -> int:
    """The closing line for inputs left out by :func:`drop_unreadable`; returns the exit code (1 if any)."""
    if unreadable:
        print(f"{prog}: {len(unreadable)} unreadable image(s) left out: {', '.join(p.name for p in unreadable)}",
              file=sys.stderr)
        return 1
    return 0


def run_sets(prog: str, args: argparse.Namespace, sets: List[Tuple[str, List[Path]]], planned: Planned,
             process: Process, min_images: int = 2, max_images: Optional[int] = None) -> int:
    """Run ``process`` on every set (from :func:`densevit.cli.common.gather_sets`); returns the exit code
    (1 if any set failed, else 0).

    Unreadable images are left out of their set (:func:`drop_unreadable`) and make the exit code 1. Per set:
    too few / many (readable) images, an existing output (without --overwrite) or a
    :class:`~densevit.errors.DensevitError` while processing (e.g. an unreadable image) prints
    ``prog: set NAME: error: message`` and the next set runs. ``summary.json`` is written beside the outputs.
    """
    nested = is_folder_of_sets(args.inputs)
    out_root = Path(args.out)
    failures = 0
    unreadable: List[Path] = []
    bar = tqdm(sets, desc=prog, unit="set", disable=args.quiet or None, file=sys.stderr)
    for name, images in bar:
        bar.set_postfix_str(name)
        out_dir = out_root / name if nested else out_root
        images, bad = drop_unreadable(prog, images, f"set {name}" if nested else "")
        unreadable += bad
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
                       **({"unreadable": [str(p) for p in bad]} if bad else {}),
                       "seconds": round(time.perf_counter() - t0, 3)}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            tqdm.write(f"{name}: {line} [{summary['seconds']:.1f} s]", file=sys.stdout)
        except DensevitError as exc:
            failures += 1
            tqdm.write(f"{prog}: set {name}: error: {exc}", file=sys.stderr)
    bar.close()
    if failures:
        print(f"{prog}: {failures} of {len(sets)} set(s) failed", file=sys.stderr)
    return max(1 if failures else 0, report_unreadable(prog, unreadable))


def stems(images: Sequence[Path]) -> List[str]:
    """Output name stems of a set's images (prefixed by their index when two share a stem)."""
    names = [p.stem for p in images]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names
