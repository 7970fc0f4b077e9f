"""VIP part tracking: propagate each video's first-frame part map and score mIoU as CRW's ``eval_vip.py``.

    python benchmarks/vip.py --filelist LIST --out DIR --protocol crw --crop-size 320 --context 20 --topk 10
        --radius 12 --temperature 0.07 --weights W --backbone B

LIST is videowalk's VIP format: each line an ``Images/<video>`` frames folder and its
``Annotations/Category_ids/<video>`` label folder (the first label file, in the order of the numbers, belongs to
frame 0). The first label map becomes one channel per distinct value after CRW's resize
(:func:`densevit.apps.propagation.part_onehots`), is propagated with the CRW protocol and read back by argmax.

Writes ``DIR/<video>/<frame>.png`` (class ids, greyscale, at the frame's original size; every frame including the
first) and ``DIR/miou.csv`` (one row: the IoU of each of the 20 classes and ``miou``, their nanmean, from one
histogram over every frame of every listed video, as the reference). Resumable per video (``--recompute`` to
redo; ``DIR/settings.json`` keeps the settings and a run with others is refused). Under ``torchrun`` the videos
are dealt to the ranks and rank 0 scores them all.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from densevit.apps.cli.propagation import add_propagation_flags, crw_config
from densevit.apps.propagation import part_onehots, part_readout, propagate_soft, read_label_image
from densevit.cli.common import build_extractor, run_cli
from densevit.cli.flags import make_parser
from densevit.errors import DensevitError
from densevit.eval.datasets.jhmdb import read_filelist
from densevit.eval.datasets.vip import vip_frames, vip_labels
from densevit.eval.metrics.propagation import VIP_CLASSES, vip_frame_hist, vip_iou
from densevit.eval.propagation_runs import check_settings, plan_videos, settings_of
from densevit.io.files import atomic_write, check_outputs
from densevit.io.images import image_size
from densevit.runtime import dist

PROG = "benchmarks/vip.py"
DONE = ".done.json"
EPILOG = """\
--filelist line: an Images/<video> frames folder and its Annotations/Category_ids/<video> folder, space-separated.
writes: OUT/<video>/<frame>.png (class ids at the frame's size, every frame) and OUT/miou.csv (20 IoUs, miou).
several processes: torchrun --standalone --nproc_per_node N benchmarks/vip.py ... (videos dealt to the ranks,
rank 0 scores them all); an interrupted run resumes with the same command."""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "VIP part tracking (mIoU) of ViT label propagation, CRW's protocol.", epilog=EPILOG)
    add_propagation_flags(p)
    return p


def write_png(path: Path, ids: np.ndarray) -> None:
    atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8)).save(f, format="PNG"))


def run_video(extractor, frames: Sequence[Path], first_label: Path, out: Path, cfg, progress: bool) -> None:
    """Propagate one video's first part map; write one PNG per frame and the video's done marker."""
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)
    patch = extractor.grid((cfg.crop_size, cfg.crop_size)).patch_size
    cfg.validate(patch)
    first, ids = part_onehots(read_label_image(first_label), cfg.crop_size, patch)
    for frame, pred in zip(frames, propagate_soft(extractor, frames, first, cfg, progress=progress)):
        write_png(out / f"{frame.stem}.png", part_readout(pred, ids, cfg.crop_size, image_size(frame)))
    atomic_write(out / DONE, lambda f: f.write(json.dumps({"frames": len(frames)}).encode()))


def _main(argv: Optional[Sequence[str]], ctx: dist.DistContext) -> int:
    args = build_parser().parse_args(argv)
    args.device = ctx.device(args.device)
    cfg = crw_config(args)
    videos = read_filelist(args.filelist)
    names = [frames.name for frames, _ in videos]
    if len(set(names)) != len(names):
        raise DensevitError(f"{args.filelist} lists two videos of one name; their results would collide")
    out = Path(args.out)
    check_outputs([args.filelist] + [p for video in videos for p in video], folders=[out])   # never into inputs
    progress = not args.quiet
    if not args.eval_only:
        def todo():
            check_settings(out, settings_of(args), args.recompute, lambda: list(out.glob(f"*/{DONE}")))
            return [i for i, n in enumerate(names) if args.recompute or not (out / n / DONE).is_file()]

        mine = plan_videos(ctx, todo, lambda idx: [float(len(vip_frames(videos[i][0]))) for i in idx])
        extractor = None
        for n, i in enumerate(mine):
            frames, labels = videos[i]
            extractor = extractor or build_extractor(args)
            if progress:
                rank = f"rank {ctx.rank}: " if ctx.world_size > 1 else ""
                print(f"{rank}[{n + 1}/{len(mine)}] {names[i]}", file=sys.stderr)
            run_video(extractor, vip_frames(frames), vip_labels(labels)[0], out / names[i], cfg,
                      progress and ctx.is_main)
        ctx.barrier()
    elif not out.is_dir():
        raise DensevitError(f"no results folder {out} to evaluate")
    if not ctx.is_main:
        return 0
    hist = np.zeros((len(VIP_CLASSES), len(VIP_CLASSES)))
    for (frames, labels), name in zip(videos, names):
        if not (out / name).is_dir():
            raise DensevitError(f"missing results of {name} in {out}")
        missing = 0
        for png in sorted((out / name).glob("*.png")):
            gt = labels / png.name
            if gt.is_file():
                hist += vip_frame_hist(png, gt)
            else:
                missing += 1
        if missing:
            print(f"{PROG}: {missing} frames of {name} have no ground truth (not scored)", file=sys.stderr)
    iu, miou = vip_iou(hist)
    header = list(VIP_CLASSES) + ["miou"]
    row = [("nan" if math.isnan(v) else f"{v:.4f}") for v in list(iu) + [miou]]

    def write(f) -> None:
        text = io.StringIO()
        csv.writer(text).writerows([header, row])
        f.write(text.getvalue().encode())

    atomic_write(out / "miou.csv", write)
    for c, v in zip(header, row):
        print(f"{c:<15} {v}")
    print(f"results in {out}")
    return 0


main = dist.main_with_session(_main)
entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
