"""What every densevit command-line tool shares: error handling, extractor flags, input gathering, the output
rule (:func:`check_outputs`) and the unreadable-image lines (:func:`skip_unreadable`, :func:`report_unreadable`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

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


class _Given(argparse.Action):
    """Store a flag's value and remember that it was given (with ``--store`` a given flag must agree with the
    store's settings; one left out takes the store's)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def add_backbone_args(parser: argparse.ArgumentParser, *, stride: Optional[int] = 4, load_size: Optional[int] = 224,
                      layer: Optional[int] = 11, facet: Optional[str] = "key") -> None:
    """Add the flags that choose and configure the extractor (backbone, weights, stride, device, dtype...)."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--backbone", action=_Given, default="dino_vits8", help="backbone name (see `densevit-extract --list-backbones`)")
    g.add_argument("--weights", action=_Given, default=None,
                   help="weights: a checkpoint file, 'random', or unset to search $DENSEVIT_WEIGHTS then the timm hub")
    g.add_argument("--stride", action=_Given, type=int, default=stride, help="patch-embedding stride (must divide the patch size)")
    if load_size is not None:
        g.add_argument("--load-size", action=_Given, type=int, default=load_size, help="resize the shorter image side to this")
    if layer is not None:
        g.add_argument("--layer", type=int, default=layer, help="block index, 0-based (-1 = last)")
    if facet is not None:
        from ..extractor import FACETS

        g.add_argument("--facet", default=facet, choices=list(FACETS),
                       help="key/query: before RoPE on rotary backbones (key_rope/query_rope: after it)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--dtype", action=_Given, default="float32", choices=["float32", "float16", "bfloat16"])


def build_extractor(args: argparse.Namespace):
    """Build a ViTExtractor from the flags added by :func:`add_backbone_args`."""
    from ..extractor import ViTExtractor

    return ViTExtractor(args.backbone, stride=args.stride, weights=args.weights, device=args.device, dtype=args.dtype)


def add_store_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--store``: read the features from a feature store instead of running the model."""
    parser.add_argument("--store", default=None,
                        help="read descriptors, saliency and CLS descriptors of the input images from this feature "
                             "store (densevit-extract --store) instead of running the model (no weights loaded); "
                             "the store's backbone, weights, stride and load size apply, --layer/--facet pick the "
                             "stored ones")


def build_source(args: argparse.Namespace, *, saliency: bool = False, cls: bool = False):
    """The features' source of an application: with ``--store`` the :class:`~densevit.store.FeatureStore`, checked
    before any work (it holds ``args.layer``/``args.facet``, the saliency or CLS descriptors needed, and agrees
    with every backbone flag given); otherwise the extractor of :func:`build_extractor`, its layer checked."""
    if not getattr(args, "store", None):
        ext = build_extractor(args)
        ext.resolve_layer(args.layer)
        return ext
    from ..store import FeatureStore, StoreError

    store = FeatureStore(args.store)
    s = store.settings
    for flag, value, stored in _store_conflicts(args, s):
        raise StoreError(f"--{flag} {value} conflicts with store {store.root}, made with {flag} {stored}; "
                         f"leave it out to use the store's")
    layer = store.resolve_layer(args.layer)
    store._pick(layer, args.facet)             # the layer/facet is stored
    if saliency and not s.get("saliency"):
        raise StoreError(f"this application needs saliency maps, and store {store.root} was made without "
                         f"--saliency")
    if cls and not store.has_cls(layer, args.facet):
        raise StoreError(f"store {store.root} holds no CLS descriptors of layer {layer} facet {args.facet}")
    return store


def _store_conflicts(args: argparse.Namespace, settings: dict):
    """``(flag, given value, stored value)`` of each backbone flag given that disagrees with a store's settings."""
    given = getattr(args, "given", frozenset())
    if "backbone" in given:
        from ..backbones import get_spec

        if get_spec(args.backbone).name != settings.get("backbone"):
            yield "backbone", args.backbone, settings.get("backbone")
    if "stride" in given and args.stride != settings.get("stride"):
        yield "stride", args.stride, settings.get("stride")
    if "load_size" in given and (args.load_size if args.load_size and args.load_size > 0 else None) != (
            settings.get("load_size") or None):
        yield "load-size", args.load_size, settings.get("load_size")
    if "dtype" in given and args.dtype != settings.get("model_dtype"):
        yield "dtype", args.dtype, settings.get("model_dtype")
    if "weights" in given:
        from ..dataset_extract import weights_fingerprint

        stored = settings.get("weights") or {}
        try:
            same = weights_fingerprint(args.weights, settings.get("backbone")) == stored
        except OSError:
            same = False
        if not same:
            yield "weights", args.weights, stored.get("name") or stored.get("source")


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


# ------------------------------------------------------------------------------------------------ outputs
PathLike = Union[str, Path]


class WritesIntoInputsError(DensevitError):
    """An output would be written into a command's inputs (refused, ``--overwrite`` or not)."""


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _creatable(path: Path) -> None:
    """Refuse an output whose would-be parent folder is a file (``--out FILE/sub``): one line, not mkdir's error."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DensevitError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def check_outputs(inputs: Iterable[PathLike] = (), folders: Iterable[PathLike] = (), files: Iterable[PathLike] = (),
                  overwrite: bool = False) -> None:
    """The one output rule of every command, checked before it writes anything (raises a one-line
    :class:`DensevitError`; commands exit 2):

    * an output folder (``folders``) is a folder or does not exist yet; an output file (``files``) is not a
      folder, and an existing one is replaced only with ``overwrite``; no output lies below a file;
    * no command writes into its inputs, ``overwrite`` or not: an output folder that is, lies inside or
      contains an input folder, and an output file that is an input file or lies inside an input folder, are
      refused. ``inputs`` are the paths the command reads (files or folders; missing ones and None are
      ignored here)."""
    in_dirs: List[Tuple[Path, Path]] = []           # (as given, resolved)
    in_files: List[Tuple[Path, Path]] = []
    for p in inputs:
        if p is not None and Path(p).is_dir():
            in_dirs.append((Path(p), _real(p)))
        elif p is not None and Path(p).exists():
            in_files.append((Path(p), _real(p)))
    for out in map(Path, folders):
        if out.exists() and not out.is_dir():
            raise DensevitError(f"output folder {out} exists and is not a folder; give a folder to write into")
        _creatable(out)
        r = _real(out)
        for given, d in in_dirs:
            how = ("is" if r == d else "lies inside" if d in r.parents else "contains" if r in d.parents else None)
            if how:
                raise WritesIntoInputsError(f"output folder {out} {how} the input folder {given}; no command "
                                            f"writes into its inputs: choose another output folder")
    for out in map(Path, files):
        if out.is_dir():
            raise DensevitError(f"output {out} is a folder; give a file name")
        _creatable(out)
        r = _real(out)
        for given, f in in_files:
            if r == f or (out.exists() and os.path.samefile(out, given)):
                raise WritesIntoInputsError(f"output {out} is the input {given}; no command writes into its "
                                            f"inputs: choose another output")
        for given, d in in_dirs:
            if d in r.parents:
                raise WritesIntoInputsError(f"output {out} lies inside the input folder {given}; no command "
                                            f"writes into its inputs: choose another output folder")
        if out.exists() and not overwrite:
            raise DensevitError(f"{out} exists; pass --overwrite to replace it")


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite`` (:func:`check_outputs` of one file)."""
    check_outputs(files=[path], overwrite=overwrite)


# ------------------------------------------------------------------------------------------------ unreadable images
MAX_LISTED = 10     # names shown in the closing line of unreadable images


def skip_unreadable(prog: str, reason: object, where: str = "") -> None:
    """The one line for an input image left out because it cannot be read (every command, every mode):
    ``prog: [where: ]skipping unreadable image: reason``, written above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{prog}: {where + ': ' if where else ''}skipping unreadable image: {reason}", file=sys.stderr)


def check_readable(path: Path) -> None:
    """Raise :class:`~densevit.preprocess.UnreadableImageError` with one line if ``path`` cannot be decoded as an
    image. Decodes the whole file (JPEGs at reduced scale, which still reads every byte), so truncated and
    garbage files are caught, and images over the size limit (:func:`densevit.preprocess.max_pixels`)."""
    from ..preprocess import load_resized

    load_resized(path, 16, fast_jpeg=True)


def drop_unreadable(prog: str, images: Sequence[Path], where: str = "") -> Tuple[List[Path], List[Path]]:
    """The rule every command follows for bad input images, checked before the work: each unreadable image is
    reported in one line (:func:`skip_unreadable`) and left out. Returns ``(readable, unreadable)``; callers
    process the readable ones and close with :func:`report_unreadable` (exit code 1)."""
    from ..preprocess import UnreadableImageError

    good: List[Path] = []
    bad: List[Path] = []
    for p in images:
        try:
            check_readable(p)
            good.append(p)
        except UnreadableImageError as exc:
            bad.append(p)
            skip_unreadable(prog, exc, where)
    return good, bad


def report_unreadable(prog: str, unreadable: Sequence[PathLike]) -> int:
    """The one closing line for images left out by :func:`skip_unreadable` (``prog: N unreadable image(s) left
    out: names``, sorted, the first :data:`MAX_LISTED` named); returns the exit code: 1 if any, else 0."""
    if not unreadable:
        return 0
    names = sorted(Path(p).name if isinstance(p, Path) else str(p) for p in unreadable)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    print(f"{prog}: {len(names)} unreadable image(s) left out: {', '.join(names[:MAX_LISTED])}{more}",
          file=sys.stderr)
    return 1
