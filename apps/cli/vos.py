"""densevit-vos: propagate a first-frame mask through a folder of frames.

    densevit-vos --frames DIR --first-mask PNG --out DIR [--gif PATH] [--video PATH]
    densevit-vos --frames DIR --discover [--discover-method tokencut|lost] --out DIR     (unsupervised)
    densevit-vos --frames DIR --first-points points.json --out DIR [--gif PATH]           (keypoints)

``--protocol crw`` propagates with CRW's protocol instead of DINO's, and ``--first-points`` tracks keypoints
(both in :mod:`densevit.apps.cli.vos_tracks`).

With ``--discover`` no mask is given: the object is discovered in the first frame (TokenCut or LOST on the
last block's keys, :mod:`densevit.apps.discovery`; object id 1) and propagated like a given mask.

Writes one indexed PNG (DAVIS palette, the first mask's object ids) per frame, named after the frame, and
optionally an overlay animation (GIF, or MP4/AVI through OpenCV).
"""
from __future__ import annotations

import argparse
import errno
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from densevit.cli import flags
from densevit.cli.common import OutputOptions, add_model_flags, build_extractor, patch_size_of, run_cli
from densevit.cli.flags import add_config_flags, make_parser
from densevit.errors import DensevitError
from densevit.eval.datasets.davis import DAVIS_PALETTE, read_mask, write_mask
from densevit.io.files import OutputWriteError, atomic_path, atomic_write, check_outputs
from densevit.io.images import drop_unreadable, gather_images, load_image, report_unreadable
from densevit.options import opt
from densevit.runtime.progress import Progress
from densevit.runtime.threads import BackgroundWriter

from ..discovery.core import discover_mask
from ..vos import VOSConfig
from .discover import add_discover_args
from .discover import config_from_args as discover_config_from_args
from .vos_tracks import add_track_flags, check_crw_flags, propagate_masks, run_points

PROG = "densevit-vos"


@dataclass(frozen=True)
class VOSIO:
    """The frames, the first frame's object, and the optional animation."""

    frames: Optional[str] = opt(None, "folder of frames (sorted by file name)", required=True)
    first_mask: Optional[str] = opt(None, "mask of the first frame: palette PNG of object ids, or greyscale (e.g. "
                                          "0/255)")
    discover: bool = opt(False, "unsupervised: discover the object in the first frame (no mask given)",
                         negatable=False)
    gif: Optional[str] = opt(None, "also write an overlay animation to this .gif file")
    video: Optional[str] = opt(None, "also write an overlay video to this .mp4/.avi file")
    fps: float = opt(10.0, "frame rate of the GIF/video")
    alpha: float = opt(0.5, "mask opacity in the overlay")


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """Flags of :class:`VOSConfig` (defaults: DINO's DAVIS protocol)."""
    add_config_flags(parser, VOSConfig, title="propagation (defaults: DINO's DAVIS protocol)")


def config_from_args(args: argparse.Namespace) -> VOSConfig:
    cfg = flags.config_from_args(VOSConfig, args)
    cfg.validate()
    cfg.options()               # --upsample-weights checked, AnyUp's weights read once, before any work
    given = getattr(args, "given", frozenset())
    if "upsample_factor" in given:
        if not cfg.upsample:
            raise DensevitError("--upsample-factor applies to --upsample METHOD; give both or neither")
        patch = patch_size_of(args)
        if patch % cfg.upsample_factor:
            divisors = [d for d in range(1, patch + 1) if patch % d == 0]
            raise DensevitError(f"--upsample-factor {cfg.upsample_factor} does not divide the {patch}-pixel patch; "
                                f"choose one of {', '.join(map(str, divisors))}")
    return cfg


def overlay(frame: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame ``HxWx3`` uint8 with each object's pixels blended with its DAVIS palette colour (id 255, the
    foreground of binary 0/255 masks, drawn in the colour of id 1) and object outlines drawn dark."""
    import cv2

    img = np.asarray(frame.convert("RGB"), dtype=np.float32)
    palette = DAVIS_PALETTE.copy()
    palette[255] = palette[1]
    colours = palette[mask].astype(np.float32)
    obj = (mask > 0)[..., None]
    out = np.where(obj, (1 - alpha) * img + alpha * colours, img)
    edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = 0.35 * colours[edges]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def single_object_as_one(mask: np.ndarray) -> np.ndarray:
    """A first mask with one object whose id is not 1 (a binary 0/255 mask, DAVIS-2016's annotations) as id 1,
    so the masks written hold object 1 in its DAVIS colour (id 255 is DAVIS's "void")."""
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if len(ids) == 1 and ids[0] != 1:
        return np.where(mask == ids[0], 1, 0).astype(mask.dtype)
    return mask


class _VideoSink:
    """Collects overlay frames into a GIF (PIL, frames kept palettised in memory) and/or a video (OpenCV, written
    to a temp name that replaces the video only when complete: :func:`densevit.io.files.atomic_path`)."""

    def __init__(self, gif: Optional[Path], video: Optional[Path], fps: float) -> None:
        self.gif, self.video, self.fps = gif, video, fps
        self.gif_frames: List[Image.Image] = []
        self.writer = None
        self.frames = 0
        self._tmp = ExitStack()

    def add(self, rgb: np.ndarray) -> None:
        if self.gif is not None:
            self.gif_frames.append(Image.fromarray(rgb).quantize(colors=255, method=Image.Quantize.MEDIANCUT))
        if self.video is not None:
            import cv2

            if self.writer is None:
                tmp = self._tmp.enter_context(atomic_path(self.video))
                fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.video.suffix.lower() == ".avi" else "mp4v"))
                self.writer = cv2.VideoWriter(str(tmp), fourcc, self.fps, (rgb.shape[1], rgb.shape[0]))
                self._written = tmp
                if not self.writer.isOpened():
                    raise DensevitError(f"cannot open a video writer for {self.video} (try a .mp4 or .avi name)")
            self.writer.write(rgb[..., ::-1].copy())
            self.frames += 1

    def close(self) -> None:
        """Finish the animation files (each replaces its target only when complete)."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            self._check_video()
            self._tmp.close()                               # the complete video replaces its target
        if self.gif is not None and self.gif_frames:
            frames = self.gif_frames
            atomic_write(self.gif, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                             duration=int(round(1000 / self.fps)), loop=0))

    def abort(self) -> None:
        """Drop what was written (the run failed): no partial animation is left."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self._tmp.__exit__(DensevitError, DensevitError("aborted"), None)

    def _check_video(self) -> None:
        """OpenCV's writer reports no write error: read the frame count back (a full disk truncates the file)."""
        import cv2

        cap = cv2.VideoCapture(str(self._written))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if n != self.frames:
            full = shutil.disk_usage(self._written.parent).free < (1 << 20)
            self.abort()
            raise OutputWriteError(self.video, OSError(errno.ENOSPC if full else errno.EIO,
                                                       "no space left" if full else "the video writer failed"))


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Propagate a first-frame object mask or keypoints through a video (label "
                    "propagation on ViT features; DINO's protocol or CRW's).")
    add_config_flags(p, VOSIO, only=["frames"])
    first = p.add_mutually_exclusive_group(required=True)
    add_config_flags(first, VOSIO, only=["first_mask", "discover"])
    add_config_flags(p, OutputOptions, only=["out"],
                     tweak={"out": {"help": "output folder for the per-frame indexed PNG masks"}})
    add_config_flags(p, VOSIO, only=["gif", "video", "fps", "alpha"])
    add_config_flags(p, OutputOptions, only=["overwrite", "quiet"])
    add_protocol_args(p)
    add_track_flags(p, first)        # --first-points, --protocol, CRW's flags (vos_tracks.py)
    add_model_flags(p, stride="patch")
    add_discover_args(p, prefix="discover-", load_size=-1)
    return p


def discovery_config(args: argparse.Namespace):
    """The first-frame discovery settings of ``--discover-*`` flags: the last block's keys; the load size
    defaults (-1) to the propagation's short side."""
    cfg = discover_config_from_args(args, prefix="discover-", layer=-1, facet="key")
    if args.discover_load_size < 0:
        from dataclasses import replace

        cfg = replace(cfg, load_size=args.short_side)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.first_points:
        return run_points(args, PROG, build_extractor, drop_unreadable, report_unreadable)
    if not Path(args.frames).is_dir():
        raise DensevitError(f"--frames must be a folder of frames: {args.frames}")
    out = Path(args.out)
    check_outputs([args.frames, args.first_mask], folders=[out])    # before reading any frame
    all_frames = gather_images([args.frames])
    frames, unreadable = drop_unreadable(PROG, all_frames, min_side=patch_size_of(args))
    if not frames:
        raise DensevitError(f"no readable frame in {args.frames}")
    if all_frames[0] in unreadable and not args.discover:
        raise DensevitError(f"the first frame {all_frames[0].name} is unreadable; the first mask belongs to it")
    dcfg = discovery_config(args) if args.discover else None
    first_mask = None if args.discover else single_object_as_one(read_mask(args.first_mask))
    targets = [out / f"{f.stem}.png" for f in frames]
    if len({t.name for t in targets}) != len(targets):
        raise DensevitError(f"frames in {args.frames} share file stems; their masks would overwrite each other")
    extra = [Path(p) for p in (args.gif, args.video) if p]
    check_outputs([args.frames, args.first_mask], folders=[out], files=extra + targets, overwrite=args.overwrite)
    if args.gif and Path(args.gif).suffix.lower() != ".gif":
        raise DensevitError(f"--gif must name a .gif file: {args.gif}")
    if not 0 <= args.alpha <= 1 or args.fps <= 0:
        raise DensevitError("--alpha must lie in [0, 1] and --fps must be positive")
    check_crw_flags(args)
    extractor = build_extractor(args)
    if dcfg is not None:
        first_mask = discover_mask(extractor, frames[0], dcfg)
    out.mkdir(parents=True, exist_ok=True)
    sink = _VideoSink(Path(args.gif) if args.gif else None, Path(args.video) if args.video else None, args.fps)
    progress = Progress(PROG, quiet=args.quiet)
    progress.stage(f"propagating ({len(frames)} frames)")           # off a terminal; on one, the bar
    try:
        with BackgroundWriter() as writer:
            for frame, target, mask in zip(frames, targets, propagate_masks(args, extractor, frames, first_mask,
                                                                            cfg, progress=progress.terminal and not args.quiet)):
                writer.submit(write_mask, target, mask)
                if extra:
                    sink.add(overlay(load_image(frame), mask, args.alpha))
    except BaseException:
        sink.abort()
        raise
    sink.close()
    ids = [int(i) for i in np.unique(first_mask) if i != 0]
    print(f"wrote {len(targets)} masks to {out} (object ids: {', '.join(map(str, ids)) or 'none'})")
    return report_unreadable(PROG, unreadable)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
