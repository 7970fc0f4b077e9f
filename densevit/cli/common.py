"""What every densevit command-line tool shares: error handling (:func:`run_cli`), the model and output flags, the
feature source of a command. Input gathering and the unreadable-image lines live in :mod:`densevit.io.images`, the
output rule (:func:`~densevit.io.files.check_outputs`) in :mod:`densevit.io.files`."""
from __future__ import annotations

import argparse
import errno
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import DensevitError, RandomWeightsWarning
from ..io.files import OutputWriteError
from ..features.options import FeatureOptions
from ..io.images import max_pixels
from ..options import opt
from .flags import add_config_flags


def run_cli(main: Callable[[Optional[Sequence[str]]], int], prog: str) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a CLI ``main(argv) -> exit code`` so user errors print one line and exit 2, never a traceback, and
    densevit's warnings (random weights: :class:`~densevit.errors.RandomWeightsWarning`) print one line
    each on stderr (``prog: warning: ...``). The one error path of writing: an :class:`OSError` that reaches here
    (a full disk, a read-only place, a file where a folder should be) is the same one line naming the path
    (:class:`OutputWriteError`)."""

    def entry(argv: Optional[Sequence[str]] = None) -> int:
        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, RandomWeightsWarning):
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        try:
            with warnings.catch_warnings():
                shown = warnings.showwarning
                warnings.simplefilter("always", RandomWeightsWarning)
                warnings.showwarning = show
                max_pixels()            # a bad $DENSEVIT_MAX_PIXELS: one line before any work
                code = main(argv)
        except DensevitError as exc:
            print(f"{prog}: error: {getattr(exc, 'cli_message', exc)}", file=sys.stderr)
            code = 2
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS and exc.filename:
                line = OutputWriteError.describe(Path(exc.filename), exc)
            else:
                line = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            print(f"{prog}: error: {line}", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            code = 130
        if argv is None:
            sys.exit(code)
        return code

    return entry


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

DTYPES = ("float32", "float16", "bfloat16")
STRIDE_RULES = {"half": "half the patch size (4 for /8, 7 for /14, 8 for /16): the finer stride of Amir et al.",
                "patch": "the patch size"}


@dataclass(frozen=True)
class ModelOptions:
    """The flags that choose and configure the extractor."""

    backbone: str = opt("dino_vits8", "backbone name (see `densevit-extract --list-backbones`)")
    weights: Optional[str] = opt(None, "a checkpoint file, a transformers folder / model.safetensors, 'random', or "
                                       "unset to search $DENSEVIT_WEIGHTS, torch.hub's checkpoints, the Hugging Face "
                                       "cache, then download")
    stride: Optional[int] = opt(None, "patch-embedding stride (must divide the patch size)")
    device: Optional[str] = opt(None, "cpu, cuda, cuda:N (default: cuda when available)")
    dtype: str = opt("float32", "model dtype", choices=DTYPES)


@dataclass(frozen=True)
class OutputOptions:
    """Where a command writes, and how loudly."""

    out: Optional[str] = opt(None, "output folder", short=("-o",), required=True)
    overwrite: bool = opt(False, "replace existing output files", negatable=False)
    quiet: bool = opt(False, "no progress bar", negatable=False)


def add_model_flags(parser: argparse.ArgumentParser, *, stride: str = "half", backbone: Optional[str] = None) -> None:
    """Add the :class:`ModelOptions` flags; a stride not given is ``stride``'s rule of :data:`STRIDE_RULES`
    (:func:`resolve_stride`), so the defaults suit every backbone."""
    add_config_flags(parser, ModelOptions, title="backbone", defaults={"backbone": backbone} if backbone else None,
                     tweak={"stride": {"help": ModelOptions.__dataclass_fields__["stride"].metadata["help"]
                                       + f" (default: {STRIDE_RULES[stride]})"}})
    parser.set_defaults(stride_rule=stride)


def resolve_stride(args: argparse.Namespace) -> int:
    """``--stride``, or the command's rule (:func:`add_model_flags`) applied to the backbone's patch size; with
    ``--upsample`` the patch size (pixel-dense features come from the upsampler, not the stride trick)."""
    if args.stride is not None:
        return args.stride
    from ..models.registry import get_spec

    spec = get_spec(args.backbone)
    if getattr(args, "stride_rule", "patch") == "half" and not getattr(args, "upsample", None):
        return spec.fine_stride
    return spec.patch_size


def add_backbone_args(parser: argparse.ArgumentParser, *, stride: str = "half", load_size: Optional[int] = 224,
                      layer: Optional[int] = 11, facet: Optional[str] = "key") -> None:
    """:func:`add_model_flags` and, for commands without a config of their own, the :class:`FeatureOptions`
    flags with these defaults (None: no such flag)."""
    add_model_flags(parser, stride=stride)
    wanted = {"load_size": load_size, "layer": layer, "facet": facet}
    add_config_flags(parser, FeatureOptions, title="descriptors", only=[k for k, v in wanted.items() if v is not None],
                     defaults={k: v for k, v in wanted.items() if v is not None})


def build_extractor(args: argparse.Namespace):
    """Build a ViTExtractor from the :class:`ModelOptions` flags."""
    from ..features.extractor import ViTExtractor

    return ViTExtractor(args.backbone, stride=resolve_stride(args), weights=args.weights, device=args.device,
                        dtype=args.dtype)


def source_provenance(source) -> dict:
    """Which weights made the features of ``source`` (an extractor, a feature store, or either wrapped):
    :func:`~densevit.models.provenance.weights_provenance`, computed once, or a store's recorded one."""
    prov = getattr(source, "provenance", None)
    if prov is not None:
        return dict(prov)
    from ..models.provenance import from_fingerprint

    settings = source.settings
    return from_fingerprint(settings.get("weights") or {}, settings.get("backbone"))


def add_store_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--store``: read the features from a feature store instead of running the model."""
    parser.add_argument("--store", default=None,
                        help="read descriptors, saliency and CLS descriptors of the input images from this feature "
                             "store (densevit-extract --store) instead of running the model (no weights loaded); "
                             "the store's backbone, weights, stride and load size apply, --layer/--facet pick the "
                             "stored ones")


def build_source(args: argparse.Namespace, *, saliency: bool = False, cls: bool = False):
    """The features' source of an application: with ``--store`` the :class:`~densevit.storage.store.FeatureStore`, checked
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
    store.select(layer, args.facet)             # the layer/facet is stored
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


def patch_size_of(args: argparse.Namespace) -> int:
    """The patch size of the model a command's features come from (``--store``: the store's), the smallest image
    side it reads (:func:`~densevit.io.images.check_min_side`)."""
    store = getattr(args, "store", None)
    if store:
        from ..storage.store import FeatureStore

        size = FeatureStore(store).settings.get("patch_size")
        if size:
            return int(size)
    from ..models.registry import get_spec

    return get_spec(args.backbone).patch_size
