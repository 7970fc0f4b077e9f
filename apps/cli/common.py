"""What the application CLIs share: set gathering, per-set output folders, the output rule (refusing to overwrite
or to write into the inputs: :func:`densevit.io.files.check_outputs`), the progress bar over sets, one
summary line per set, per-set error reporting (a bad set never stops the others) and the one rule for
unreadable inputs (:func:`densevit.io.images.drop_unreadable`: reported in one line each, left out, the rest
processed, exit code non-zero at the end)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from densevit.cli.common import OutputOptions, add_model_flags, add_store_arg, patch_size_of
from densevit.io.images import drop_unreadable, report_unreadable
from densevit.cli.flags import add_config_flags, config_from_args, make_parser
from densevit.cli.common import source_provenance
from densevit.errors import DensevitError
from densevit.io.files import OutputWriteError, WritesIntoInputsError, atomic_write_text, check_outputs
from densevit.runtime.progress import Progress, reporting
from densevit.io.images import decode_once
from densevit.options import opt

__all__ = ["add_io_args", "load_size_arg", "is_folder_of_sets", "run_sets", "stems"]

# process(name, images, out_dir) -> (summary line, summary dict written as summary.json; its "timings" rounded)
Process = Callable[[str, List[Path], Path], Tuple[str, Dict]]
Planned = Callable[[str, List[Path], Path], List[Path]]


@dataclass(frozen=True)
class SetsIO:
    """The inputs and pictures of the set commands (the output folder and its rules: :class:`OutputOptions`)."""

    inputs: Tuple[str, ...] = opt((), "image files, a folder of images, or a folder of sets (one sub-folder per set)",
                                  positional=True, nargs="+")
    max_side: int = opt(1024, "longest side of the overlay pictures in pixels (raw masks keep the original size)")


def add_io_args(parser: argparse.ArgumentParser, **tweak: Dict) -> None:
    """Positional inputs, -o/--out, --overwrite, --quiet, --max-side (``tweak``: metadata changes by field)."""
    add_config_flags(parser, SetsIO, only=["inputs"], tweak=tweak)
    add_config_flags(parser, OutputOptions, tweak={"out": {"help": "output folder (one sub-folder per set for a "
                                                           "folder of sets)"}, **tweak})
    add_config_flags(parser, SetsIO, only=["max_side"], tweak=tweak)


def sets_parser(prog: str, description: str, *configs: Tuple[type, str]) -> argparse.ArgumentParser:
    """The parser of a set command: inputs and outputs (:func:`add_io_args`), the flags of each ``(config class,
    group title)``, the model flags and ``--store``."""
    p = make_parser(prog, description)
    add_io_args(p)
    for cls, title in configs:
        add_config_flags(p, cls, title=title)
    add_model_flags(p)
    add_store_arg(p)
    return p


def check_saliency_source(args: argparse.Namespace) -> None:
    """The reference's saliency needs a second pass of the model, which a feature store cannot give."""
    if getattr(args, "store", None) and args.saliency_source == "reference":
        raise DensevitError("--store holds the saliency of its own pass only: add --saliency-source same-pass "
                            "(the reference's low-resolution saliency needs the model)")


def clustering_inputs(args: argparse.Namespace, cls: bool = False):
    """``(sets, source)`` of co-segmentation and part co-segmentation: the input sets, and the feature source
    checked for what they read (saliency; the CLS descriptors with ``cls``; the reference's saliency needs the
    model; with ``--upsample``, pixel-dense features: :class:`~densevit.features.upsampled.UpsampledSource`)."""
    from densevit.cli.common import build_source
    from densevit.io.images import gather_sets
    from densevit.features.upsampled import UpsampleOptions, upsampled

    sets = gather_sets(args.inputs)
    check_sets_outputs(args, sets)
    source = build_source(args, saliency=True, cls=cls)
    check_saliency_source(args)
    return sets, upsampled(source, config_from_args(UpsampleOptions, args))


@contextmanager
def timed(timings: Dict[str, float], step: str) -> Iterator[None]:
    """``with timed(res.timings, "drawing"):`` records the block's wall time under ``step``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = time.perf_counter() - t


def planned_pictures(*kinds: str) -> Planned:
    """``planned`` of :func:`run_sets` for commands writing ``<stem>_<kind>.png`` per image of a set."""

    def planned(name: str, images: List[Path], out: Path) -> List[Path]:
        return [out / f"{s}_{kind}.png" for s in stems(images) for kind in kinds]

    return planned


def validated_config(cls: type, args: argparse.Namespace):
    """``cls`` built from the parsed flags and validated (one-line errors)."""
    cfg = config_from_args(cls, args)
    cfg.validate()
    return cfg


def load_size_arg(value: int) -> Optional[int]:
    """``--load-size`` 0 (or less) means: keep the original size."""
    return None if value is None or value <= 0 else int(value)


def is_folder_of_sets(inputs: Sequence[str]) -> bool:
    """The rule of :func:`densevit.io.images.gather_sets`: one folder holding sub-folders."""
    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        return False
    return any(d.is_dir() for d in Path(inputs[0]).iterdir())


def check_sets_outputs(args: argparse.Namespace, sets: List[Tuple[str, List[Path]]],
                       more_inputs: Sequence[Optional[str]] = ()) -> None:
    """The output rule (:func:`densevit.cli.common.check_outputs`) for the output folder of a set command and its
    per-set folders: not in the inputs (``args.inputs``, ``--store``, ``more_inputs``), writable. Called before
    the model loads (and again by :func:`run_sets`)."""
    out_root = Path(args.out)
    inputs = [*args.inputs, getattr(args, "store", None), *more_inputs]
    nested = is_folder_of_sets(args.inputs)
    check_outputs(inputs, folders=[out_root] + ([out_root / name for name, _ in sets] if nested else []))


def run_sets(prog: str, args: argparse.Namespace, sets: List[Tuple[str, List[Path]]], planned: Planned,
             process: Process, min_images: int = 2, max_images: Optional[int] = None,
             more_inputs: Sequence[Optional[str]] = (), source=None, provenance: Optional[Dict] = None) -> int:
    """Run ``process`` on every set (from :func:`densevit.io.images.gather_sets`); returns the exit code
    (1 if any set failed, else 0).

    Unreadable images, and images smaller than the model's patch, are left out of their set
    (:func:`drop_unreadable`) and make the exit code 1. Per set:
    too few / many (readable) images, an existing output (without --overwrite) or a
    :class:`~densevit.errors.DensevitError` while processing (e.g. an unreadable image) prints
    ``prog: set NAME: error: message`` and the next set runs. ``summary.json`` is written beside the outputs, with
    the ``provenance`` of the weights (given, or of the features' ``source``: backbone, weights file or random,
    SHA-256). Progress: :mod:`densevit.runtime.progress` (a bar over the sets when there are several, the
    algorithms' own bars and status lines inside each).
    An output folder that is a file, or outputs in the inputs (``args.inputs``, ``--store``, ``more_inputs``:
    :func:`densevit.io.files.check_outputs`), are refused before any work (a one-line error, exit 2).
    """
    nested = is_folder_of_sets(args.inputs)
    min_side = patch_size_of(args)              # a smaller image is left out like an unreadable one
    out_root = Path(args.out)
    inputs = [*args.inputs, getattr(args, "store", None), *more_inputs]
    check_sets_outputs(args, sets, more_inputs)
    failures = 0
    unreadable: List[Path] = []
    progress = Progress(prog, quiet=args.quiet)
    if provenance is None and source is not None:
        provenance = source_provenance(source)
    with reporting(progress):
        for name, images in (progress.track(sets, "sets", "set", leave=True) if len(sets) > 1 else sets):
            progress.where = f"set {name}" if nested else ""
            out_dir = out_root / name if nested else out_root
            with decode_once():                 # checked, then extracted, from one decoding
                images, bad = drop_unreadable(prog, images, f"set {name}" if nested else "", min_side)
                unreadable += bad
                try:
                    if len(images) < min_images:
                        raise DensevitError(f"needs at least {min_images} image{'s' if min_images > 1 else ''}, "
                                            f"found {len(images)}")
                    if max_images is not None and len(images) > max_images:
                        raise DensevitError(f"needs exactly {max_images} images, found {len(images)}")
                    check_outputs(inputs, files=planned(name, images, out_dir) + [out_dir / "summary.json"],
                                  overwrite=args.overwrite)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    t0 = time.perf_counter()
                    line, summary = process(name, images, out_dir)
                    if "timings" in summary:                     # seconds per step, to the millisecond
                        summary["timings"] = {k: round(float(v), 3) for k, v in summary["timings"].items()}
                    summary = {"set": name, "images": [str(p) for p in images],
                               **({"provenance": provenance} if provenance is not None else {}), **summary,
                               **({"unreadable": [str(p) for p in bad]} if bad else {}),
                               "seconds": round(time.perf_counter() - t0, 3)}
                    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
                    tqdm.write(f"{name}: {line} [{summary['seconds']:.1f} s]", file=sys.stdout)
                except (WritesIntoInputsError, OutputWriteError):   # a full disk stops every set, in one line
                    raise
                except DensevitError as exc:
                    failures += 1
                    tqdm.write(f"{prog}: set {name}: error: {exc}", file=sys.stderr)
    if failures:
        print(f"{prog}: {failures} of {len(sets)} set(s) failed", file=sys.stderr)
    return max(1 if failures else 0, report_unreadable(prog, unreadable))


def stems(images: Sequence[Path]) -> List[str]:
    """Output name stems of a set's images (prefixed by their index when two share a stem)."""
    names = [p.stem for p in images]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names
