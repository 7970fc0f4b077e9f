"""densevit-vos beyond DINO's mask propagation: ``--protocol crw`` (CRW's label propagation, the protocol of the
JHMDB and VIP benchmarks) and ``--first-points`` (keypoint tracking through a user's video).

    densevit-vos --frames DIR --first-points points.json --out DIR [--gif tracks.gif] [--protocol dino|crw]
    densevit-vos --frames DIR --first-mask PNG --out DIR --protocol crw [--crop-size 320 --context 20 ...]

``points.json``: a list of ``{"x": .., "y": .., "name": ..}`` (name optional) or of ``[x, y]`` pairs, in pixels of
the first frame. Writes ``OUT/points.json`` (``{"names": [...], "frames": [{"frame": <file>, "points": [{"name",
"x", "y"}]}]}``, x/y null where a point is lost) and, with ``--gif``, the frames with the points and their names.
"""
from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

from densevit.cli.common import patch_size_of
from densevit.cli.flags import add_config_flags, config_from_args
from densevit.errors import DensevitError
from densevit.io.files import atomic_write, check_outputs
from densevit.io.images import gather_images, image_size, load_image
from densevit.options import opt

from ..propagation import PROTOCOLS, CRWConfig, draw_points, part_onehots, part_readout, propagate_soft, \
    read_points, track_points

__all__ = ["TrackIO", "add_track_flags", "crw_config", "propagate_masks", "run_points"]


@dataclass(frozen=True)
class TrackIO:
    """Keypoints to track and the propagation protocol."""

    first_points: Optional[str] = opt(None, "keypoints of the first frame to track (JSON list of {\"x\", \"y\", "
                                            "\"name\"} in pixels); writes OUT/points.json")
    protocol: str = opt("dino", "propagation protocol: dino (DINO's DAVIS protocol) or crw (CRW's test.py, the "
                                "JHMDB/VIP benchmarks' protocol)", choices=PROTOCOLS)


def add_track_flags(parser: argparse.ArgumentParser, first_group) -> None:
    """``--first-points`` (in ``first_group``, beside ``--first-mask``), ``--protocol`` and CRW's own flags."""
    add_config_flags(first_group, TrackIO, only=["first_points"])
    add_config_flags(parser, TrackIO, only=["protocol"])
    add_config_flags(parser, CRWConfig, only=["context", "radius", "crop_size"],
                     title="CRW protocol (--protocol crw; there --topk and --temperature default to 10 and 0.07)")


def crw_config(args: argparse.Namespace) -> CRWConfig:
    """:class:`CRWConfig` of the flags: ``--topk``/``--temperature`` as typed, else CRW's defaults."""
    given = getattr(args, "given", frozenset())
    over = {k: getattr(args, k) for k in ("topk", "temperature", "layer", "facet") if k in given}
    cfg = config_from_args(CRWConfig, args, **over)
    cfg.validate()
    return cfg


def check_crw_flags(args: argparse.Namespace) -> None:
    """Flags the crw protocol cannot take, refused in one line before the model loads."""
    if getattr(args, "protocol", None) != "crw":
        return
    if getattr(args, "upsample", None):
        raise DensevitError("--upsample is not part of the crw protocol (patch-stride features)")
    patch = patch_size_of(args)
    if args.stride is not None and patch and args.stride != patch:
        raise DensevitError(f"the crw protocol propagates patch-stride features: leave out --stride (got stride "
                            f"{args.stride} for patch {patch})")


def propagate_masks(args: argparse.Namespace, extractor, frames: Sequence[Path], first_mask: np.ndarray,
                    cfg, progress: bool) -> Iterator[np.ndarray]:
    """The id masks of every frame with ``--protocol``: DINO's (:func:`densevit.apps.vos.propagate`) or CRW's
    (each id a channel after CRW's label resize, argmax, nearest to the frame size)."""
    if args.protocol != "crw":
        from ..vos import propagate

        yield from propagate(extractor, frames, first_mask, cfg, progress=progress)
        return
    if getattr(args, "upsample", None):
        raise DensevitError("--upsample is not part of the crw protocol (patch-stride features)")
    ccfg = crw_config(args)
    patch = extractor.grid((ccfg.crop_size, ccfg.crop_size)).patch_size
    ccfg.validate(patch)
    hw = image_size(frames[0])
    if tuple(np.asarray(first_mask).shape) != tuple(hw):
        raise DensevitError(f"the first mask is {first_mask.shape[1]}x{first_mask.shape[0]} but the frames are "
                            f"{hw[1]}x{hw[0]}")
    first, ids = part_onehots(np.asarray(first_mask), ccfg.crop_size, patch)
    for frame, pred in zip(frames, propagate_soft(extractor, frames, first, ccfg, progress=progress)):
        yield part_readout(pred, ids, ccfg.crop_size, image_size(frame))


def _gif_writer(frames: List[Image.Image], fps: float):
    def write(f) -> None:
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                       duration=int(round(1000 / fps)), loop=0)
        f.write(buf.getvalue())

    return write


def run_points(args: argparse.Namespace, prog: str, build_extractor, drop_unreadable, report_unreadable) -> int:
    """``densevit-vos --first-points``: track the points, write ``OUT/points.json`` and the optional GIF."""
    from ..vos import VOSConfig

    if args.video:
        raise DensevitError("--first-points draws its tracks into --gif only (no --video)")
    if getattr(args, "upsample", None):
        raise DensevitError("--first-points tracks on patch-stride features (no --upsample)")
    if not Path(args.frames).is_dir():
        raise DensevitError(f"--frames must be a folder of frames: {args.frames}")
    out = Path(args.out)
    target = out / "points.json"
    gif = Path(args.gif) if args.gif else None
    if gif is not None and gif.suffix.lower() != ".gif":
        raise DensevitError(f"--gif must name a .gif file: {args.gif}")
    if args.fps <= 0:
        raise DensevitError("--fps must be positive")
    check_outputs([args.frames, args.first_points], folders=[out], files=[target] + ([gif] if gif else []),
                  overwrite=args.overwrite)
    all_frames = gather_images([args.frames])
    frames, unreadable = drop_unreadable(prog, all_frames)
    if not frames:
        raise DensevitError(f"no readable frame in {args.frames}")
    if all_frames[0] in unreadable:
        raise DensevitError(f"the first frame {all_frames[0].name} is unreadable; the points belong to it")
    points = read_points(args.first_points, image_size(frames[0]))
    vos_cfg = config_from_args(VOSConfig, args)
    crw_cfg = crw_config(args) if args.protocol == "crw" else None
    check_crw_flags(args)
    extractor = build_extractor(args)
    records, gif_frames = [], []
    for frame, xy in zip(frames, track_points(extractor, frames, points, args.protocol, vos_cfg, crw_cfg,
                                              progress=not args.quiet)):
        records.append({"frame": frame.name, "points": [
            {"name": n, "x": None if not np.isfinite(x) else round(float(x), 2),
             "y": None if not np.isfinite(y) else round(float(y), 2)} for n, (x, y) in zip(points.names, xy)]})
        if gif is not None:
            rgb = draw_points(load_image(frame), xy, points.names)
            gif_frames.append(Image.fromarray(rgb).quantize(colors=255, method=Image.Quantize.MEDIANCUT))
    out.mkdir(parents=True, exist_ok=True)
    doc = {"names": list(points.names), "protocol": args.protocol, "frames": records}
    atomic_write(target, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    if gif is not None:
        atomic_write(gif, _gif_writer(gif_frames, args.fps))
    lost = sum(r["points"][j]["x"] is None for r in records for j in range(len(points.names)))
    print(f"tracked {len(points.names)} points through {len(frames)} frames: {target}"
          + (f" ({lost} lost point-frames)" if lost else ""))
    return report_unreadable(prog, unreadable)
