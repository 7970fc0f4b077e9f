"""JHMDB pose tracking: propagate each video's first-frame joints and score PCK as CRW's ``eval_pck.py``.

    python benchmarks/jhmdb.py --filelist LIST --out DIR --protocol crw --crop-size 320 --context 20 --topk 10
        --radius 12 --temperature 0.07 --weights W --backbone B

LIST is videowalk's format: each line a ``Rename_Images/<class>/<video>`` frames folder and its
``joint_positions.mat``. The first frame's 15 joints become Gaussian heatmaps on the feature grid
(:func:`densevit.apps.propagation.pose_heatmaps`), are propagated with the CRW protocol, and read back as the
weighted mean of each joint's 3 strongest cells (-1: a joint with an empty map).

Writes ``DIR/joints/<i>.npy`` (``T x 15 x 2`` float32, x/y in the original frame's 0-based pixels, as
``eval_pck.py`` maps them; frame 0 included; line ``i`` of LIST; a missing joint has negative x) and
``DIR/pck.csv`` (``video, pck@0.1 ... pck@0.5``; one row per video (the mean over the joints it has) and a
final ``mean`` row: the PCK of every video's frames pooled, the mean of the 15 joints' PCKs, as the reference
prints it). Resumable (a written ``joints/<i>.npy`` is kept unless
``--recompute``; the settings are kept in ``DIR/settings.json`` and a run with others is refused).
Under ``torchrun --nproc_per_node N`` the videos are dealt to the ranks and rank 0 scores them all.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from densevit.apps.cli.propagation import add_propagation_flags, crw_config
from densevit.apps.propagation import cells_to_pixels, label_grid, pose_heatmaps, pose_readout, propagate_soft
from densevit.cli.common import build_extractor, run_cli
from densevit.cli.flags import make_parser
from densevit.errors import DensevitError
from densevit.eval.datasets.jhmdb import jhmdb_frames, jhmdb_joints, read_filelist, video_name
from densevit.eval.metrics.propagation import PCK_ALPHAS, jhmdb_distances, jhmdb_pck
from densevit.eval.propagation_runs import check_settings, plan_videos, settings_of
from densevit.io.files import atomic_write, check_outputs
from densevit.io.images import image_size
from densevit.runtime import dist

PROG = "benchmarks/jhmdb.py"
EPILOG = """\
--filelist line: a Rename_Images/<class>/<video> frames folder and its joint_positions.mat, space-separated.
writes: OUT/joints/<i>.npy (T x 15 x 2 pixels of line i; frame 0 included) and OUT/pck.csv (per video, mean).
several processes: torchrun --standalone --nproc_per_node N benchmarks/jhmdb.py ... (videos dealt to the ranks,
rank 0 scores them all); an interrupted run resumes with the same command."""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "JHMDB pose tracking (PCK) of ViT label propagation, CRW's protocol.", epilog=EPILOG)
    add_propagation_flags(p)
    return p


def track_video(extractor, frames: Sequence[Path], gt: np.ndarray, cfg, progress: bool = False) -> np.ndarray:
    """``T x J x 2`` float32 pixel joints of one video from its first frame's ground truth ``gt`` (2 x J x T)."""
    hw = image_size(frames[0])
    patch = extractor.grid((cfg.crop_size, cfg.crop_size)).patch_size
    first = pose_heatmaps(gt[:, :, 0].T, hw, cfg.crop_size, patch)
    grid_hw = label_grid(cfg.crop_size, patch)
    out = [cells_to_pixels(pose_readout(p), hw, grid_hw) for p in propagate_soft(extractor, frames, first, cfg,
                                                                                progress=progress)]
    return np.stack(out).astype(np.float32)


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(f) -> None:
        buf = io.BytesIO()
        np.save(buf, arr)
        f.write(buf.getvalue())

    atomic_write(path, write)


def score(videos, out: Path) -> List[List[str]]:
    """Rows of ``pck.csv`` (per video, then the pooled ``mean``)."""
    rows, pooled = [], []
    for i, (frames, mat) in enumerate(videos):
        path = out / "joints" / f"{i}.npy"
        if not path.is_file():
            raise DensevitError(f"missing result {path}")
        d = jhmdb_distances(np.load(path), jhmdb_joints(mat))
        pooled.append(d)
        pck = jhmdb_pck([d])            # a video's row: the mean over the joints it has (the pooled one: all 15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows.append([video_name(frames)] + [f"{np.nanmean(pck[a][:-1]):.4f}" for a in PCK_ALPHAS])
    pck = jhmdb_pck(pooled)
    rows.append(["mean"] + [f"{pck[a][-1]:.4f}" for a in PCK_ALPHAS])
    return rows


def _main(argv: Optional[Sequence[str]], ctx: dist.DistContext) -> int:
    args = build_parser().parse_args(argv)
    args.device = ctx.device(args.device)
    cfg = crw_config(args)
    videos = read_filelist(args.filelist)
    out = Path(args.out)
    check_outputs([args.filelist] + [p for video in videos for p in video], folders=[out])   # never into inputs
    progress = not args.quiet
    if not args.eval_only:
        def todo():
            check_settings(out, settings_of(args), args.recompute, lambda: list((out / "joints").glob("*.npy")))
            return [i for i in range(len(videos)) if args.recompute or not (out / "joints" / f"{i}.npy").is_file()]

        mine = plan_videos(ctx, todo, lambda idx: [float(len(jhmdb_frames(videos[i][0]))) for i in idx])
        extractor = None
        for n, i in enumerate(mine):
            frames, mat = videos[i]
            extractor = extractor or build_extractor(args)
            if progress:
                rank = f"rank {ctx.rank}: " if ctx.world_size > 1 else ""
                print(f"{rank}[{n + 1}/{len(mine)}] {video_name(frames)}", file=sys.stderr)
            joints = track_video(extractor, jhmdb_frames(frames), jhmdb_joints(mat), cfg, progress and ctx.is_main)
            save_npy(out / "joints" / f"{i}.npy", joints)
        ctx.barrier()
    elif not out.is_dir():
        raise DensevitError(f"no results folder {out} to evaluate")
    if not ctx.is_main:
        return 0
    rows = score(videos, out)
    header = ["video"] + [f"pck@{a}" for a in PCK_ALPHAS]

    def write(f) -> None:
        text = io.StringIO()
        csv.writer(text).writerows([header] + rows)
        f.write(text.getvalue().encode())

    atomic_write(out / "pck.csv", write)
    width = max(len(r[0]) for r in rows)
    print(f"{'video':<{width}}  " + "  ".join(f"{h:>8}" for h in header[1:]))
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{v:>8}" for v in r[1:]))
    print(f"results in {out}")
    return 0


main = dist.main_with_session(_main)
entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
