"""What every densevit command-line tool shares: error handling, extractor flags, input gathering, the output
rule (:func:`check_outputs`) and the unreadable-image lines (:func:`skip_unreadable`, :func:`report_unreadable`)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ..errors import DensevitError
from ..io.files import PathLike, WritesIntoInputsError, check_outputs, ensure_writable  # noqa: F401 (flags' users)
from ..io.images import (  # noqa: F401
    IMAGE_SUFFIXES,
    MAX_LISTED,
    check_readable,
    drop_unreadable,
    gather_images,
    gather_sets,
    report_unreadable,
    skip_unreadable,
)


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
        from ..features.extractor import FACETS

        g.add_argument("--facet", default=facet, choices=list(FACETS),
                       help="key/query: before RoPE on rotary backbones (key_rope/query_rope: after it)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--dtype", action=_Given, default="float32", choices=["float32", "float16", "bfloat16"])


def build_extractor(args: argparse.Namespace):
    """Build a ViTExtractor from the flags added by :func:`add_backbone_args`."""
    from ..features.extractor import ViTExtractor

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
    from ..storage.store import FeatureStore, StoreError

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
        from ..models.registry import get_spec

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
        from ..storage.extract import weights_fingerprint

        stored = settings.get("weights") or {}
        try:
            same = weights_fingerprint(args.weights, settings.get("backbone")) == stored
        except OSError:
            same = False
        if not same:
            yield "weights", args.weights, stored.get("name") or stored.get("source")
