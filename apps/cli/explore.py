"""densevit-explore: look inside a ViT's dense features in the browser.

    densevit-explore IMAGES_OR_FOLDERS... [--backbone dino_vits8 --weights W --stride 4 --load-size 224]
                     [--port 7860 --host 127.0.0.1 --allow-host NAME --out explore_out]
    densevit-explore --replay explore_out/explore_....json      # recompute a saved finding, print its matches

Starts a local web server (127.0.0.1 unless --host) and prints its address. Click a point of any image: every
image shows the cosine-similarity map of that token's descriptor with its top-k matches and best buddies; switch
layer, facet, log-binning, stride and load size; see the attention of the clicked token per layer and head, the
CLS saliency, and the PCA of all images; upload images; Save writes the view (PNG) and the finding (JSON).
The server answers only its own page: other Host names (DNS rebinding) and requests from other pages (other
origins) are refused (add names it is reached by with --allow-host). Model work runs in one queued worker;
Ctrl-C or SIGTERM stops it within about two seconds (requests still running get 0.5 s).
Needs the ``explore`` extra: ``pip install "densevit[explore]"`` (FastAPI + uvicorn).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from densevit.cli.common import add_backbone_args, resolve_stride, run_cli
from densevit.io.files import check_outputs
from densevit.io.images import gather_images
from densevit.cli.flags import add_config_flags, make_parser
from densevit.errors import DensevitError
from densevit.options import opt, zero_is_none

PROG = "densevit-explore"
INSTALL_HINT = 'the explorer needs FastAPI and uvicorn: pip install "densevit[explore]" (or pip install fastapi ' \
               'uvicorn python-multipart)'


@dataclass(frozen=True)
class ExploreOptions:
    """The explorer's server, its Save folder and its cache."""

    inputs: Tuple[str, ...] = opt((), "image files or folders of images (more can be uploaded in the page)",
                                  positional=True, nargs="*")
    host: str = opt("127.0.0.1", "address to bind (this machine only by default)")
    port: int = opt(7860, "port (0: any free port)")
    allow_host: Tuple[str, ...] = opt((), "another Host name the page may be opened by (repeatable; loopback names "
                                          "and the bound address are always allowed)", action="append",
                                      metavar="NAME", nargs=None, type=str)
    out: str = opt("explore_out", "folder Save writes to", short=("-o",))
    cache_gb: float = opt(6.0, "memory for cached descriptors")
    replay: Optional[str] = opt(None, "recompute a saved finding and print its matches (no server)", metavar="JSON")
    quiet: bool = opt(False, "no request log (without it: one line per request on stderr)", negatable=False)
    max_images: int = opt(64, "the most images kept (files given and uploads; each keeps up to ~50 MB)")
    max_upload_mib: int = opt(64, "the most bytes of one upload request, in MiB (counted while it streams)")
    max_upload_pixels: int = opt(40_000_000, "the largest uploaded image in pixels (read from its header before "
                                             "decoding)")
    upsample_weights: Optional[str] = opt(None, "AnyUp checkpoint for the page's Upsample anyup (default: "
                                                "searched in $DENSEVIT_WEIGHTS and torch.hub's checkpoint folder)")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Interactive explorer of dense ViT descriptors: similarity maps, attention, saliency and "
                    "PCA in a local web page.")
    add_config_flags(p, ExploreOptions, defaults={"allow_host": []})
    add_backbone_args(p, stride="half", load_size=224, layer=None, facet=None)
    return p


def _require_web() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
        import uvicorn  # noqa: F401
    except ImportError:
        raise DensevitError(INSTALL_HINT) from None


def replay(args: argparse.Namespace) -> int:
    """Recompute a finding saved by the page and print the clicked point and matches (original pixels)."""
    from ..explore.session import Explorer, Settings

    try:
        rec = json.loads(Path(args.replay).read_text())
        if isinstance(rec, dict) and "settings" in rec and "clicked" not in rec:
            raise DensevitError(f"{args.replay} saves a {rec.get('mode', 'picture')} view without a clicked point: "
                                f"only similarity and attention findings can be replayed")
        settings = Settings(**rec["settings"])
        clicked = rec["clicked"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DensevitError(f"cannot read finding {args.replay}: {exc}") from None
    weights = args.weights if args.weights is not None else rec.get("weights")
    ex = Explorer(rec.get("backbone", args.backbone), weights=weights, device=args.device, dtype=args.dtype,
                  stride=settings.stride, load_size=settings.load_size)
    for im in rec["images"]:
        if not im.get("path"):
            raise DensevitError(f"image {im['name']} was uploaded in the page; pass its file instead")
        ex.add_image(im["path"], name=im["name"])
    k = max(1, max((len(m["topk"]) for m in rec.get("matches", [])), default=5))
    if rec.get("mode") == "attention":
        res = ex.attention(clicked["image"], clicked["x"], clicked["y"], settings, head=rec.get("head"), k=k)
    else:
        res = ex.similarity(clicked["image"], clicked["x"], clicked["y"], settings, k=k)
    out = ex.finding(res)
    print(json.dumps({"clicked": out["clicked"], "settings": out["settings"], "matches": out["matches"]}, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replay:
        return replay(args)
    _require_web()

    from ..explore.session import Explorer
    from ..explore.web import allowed_hosts, create_app

    images = gather_images(args.inputs) if args.inputs else []
    check_outputs([*args.inputs, *images], folders=[Path(args.out)])   # Save never writes into the inputs
    if not 0 <= args.port <= 65535:
        raise DensevitError(f"--port must lie in 0..65535 (0: any free port), got {args.port}")
    for flag, value in (("--max-images", args.max_images), ("--max-upload-mib", args.max_upload_mib),
                        ("--max-upload-pixels", args.max_upload_pixels)):
        if value < 1:
            raise DensevitError(f"{flag} must be at least 1, got {value}")
    if len(images) > args.max_images:
        raise DensevitError(f"{len(images)} images given, more than the {args.max_images} the explorer keeps "
                            f"(--max-images N raises the bound)")
    if args.upsample_weights is not None:
        from densevit.upsample.anyup import resolve_weights

        resolve_weights(args.upsample_weights)      # a missing or bad file: one line, before the model loads
    ex = Explorer(args.backbone, weights=args.weights, device=args.device, dtype=args.dtype, stride=resolve_stride(args),
                  load_size=zero_is_none(args.load_size), cache_gb=args.cache_gb, max_images=args.max_images,
                  max_upload_pixels=args.max_upload_pixels, upsample_weights=args.upsample_weights)
    for path in images:  # one bad file is reported and skipped
        try:
            item = ex.add_image(path)
            if item.note:
                print(f"{PROG}: note: {item.note}", file=sys.stderr)
        except DensevitError as exc:
            print(f"{PROG}: skipped: {exc}", file=sys.stderr)
    app = create_app(ex, Path(args.out), hosts=allowed_hosts(args.host, args.allow_host), inputs=args.inputs,
                     max_upload_bytes=args.max_upload_mib << 20)
    # requests still running 0.5 s after Ctrl-C / SIGTERM are cancelled; the worker thread is a daemon
    server = make_server(app, args.host, args.port, quiet=args.quiet)
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(128)               # connections wait in the backlog from the moment the address is printed
    except OSError as exc:
        raise DensevitError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{PROG}: {len(ex.images)} image(s), {args.backbone}; open http://{host}:{port}/  (Ctrl-C stops)",
          flush=True)
    return _serve(server, sock)


def make_server(app, host: str, port: int, quiet: bool = False):
    """The uvicorn server of the explorer: warnings and errors only, plus one line per request (uvicorn's access
    log) unless ``quiet``; requests still running 0.5 s after Ctrl-C / SIGTERM are cancelled."""
    import logging

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=not quiet,
                            timeout_graceful_shutdown=0.5)
    # uvicorn logs requests at info level: the access logger alone is raised to it (startup chatter stays off)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING if quiet else logging.INFO)
    return uvicorn.Server(config)


def _serve(server, sock) -> int:
    """Serve until Ctrl-C or SIGTERM (uvicorn answers what is running for 0.5 s, then 503), then end the process
    at once: a running extraction cannot be interrupted and is not waited for, and the interpreter's teardown
    (the model, idle threads) would take seconds. Saved files are written atomically, so nothing is cut short."""
    code = 0
    try:
        server.run(sockets=[sock])            # SIGTERM: uvicorn re-raises it after stopping, ending the process
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
