"""DAVIS semi-supervised benchmark: propagate every sequence's first mask and score J and F as the toolkit.

    python benchmarks/davis.py --davis-root ROOT --year 2016|2017 --split val [--sequences a,b] [--out DIR]
    python benchmarks/davis.py --unsupervised [--discover-method tokencut|lost] ...

``--unsupervised`` (DAVIS-2016, one object): no mask is given; the object is discovered in each sequence's first
frame (TokenCut or LOST, :mod:`densevit.apps.discovery`) and propagated, and every frame is scored (the
unsupervised protocol scores the first and last frames too). Results go to their own folder
(``..._unsupervised``) and are reported apart from the semi-supervised ones.

Writes ``OUT/<seq>/<frame>.png`` (indexed, DAVIS palette), ``OUT/global_results-<split>.csv`` and
``OUT/per-sequence_results-<split>.csv`` (the toolkit's file names and columns) and prints the tables.
Resumable: a sequence whose masks are complete is not propagated again unless ``--recompute``; the settings are
stored in ``OUT/settings.json`` and a run with different settings is refused. ``--eval-only`` scores the masks
already in ``OUT`` (any method's) without a model.

Under ``torchrun --nproc_per_node N`` the sequences still to do are dealt to the ranks (longest first, each to
the least loaded rank: deterministic), every rank writes its sequences' masks, and rank 0 scores all of them
after a barrier: the same scores as one process.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from densevit.models.provenance import weights_provenance
from densevit.apps.cli.discover import add_discover_args
from densevit.apps.cli.vos import add_protocol_args, config_from_args, discovery_config
from densevit.apps.discovery.core import discover_mask
from densevit.apps.vos import propagate

from densevit.cli.common import add_model_flags, build_extractor, run_cli
from densevit.errors import DensevitError
from densevit.eval.datasets.davis import (
    DavisDataset,
    labels_for_year,
    read_mask,
    write_mask,
)
from densevit.eval.metrics.davis import (
    GLOBAL_COLUMNS,
    SEQUENCE_COLUMNS,
    DavisScores,
    evaluate_semisupervised,
)
from densevit.eval.propagation_runs import check_settings
from densevit.io.paths import shared_dir
from densevit.runtime import dist
from densevit.runtime.threads import BackgroundWriter
from densevit.io.files import atomic_write_text

PROG = "benchmarks/davis.py"
DONE = ".done.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="DAVIS semi-supervised J&F of ViT label propagation.")
    p.add_argument("--davis-root", default=str(shared_dir() / "data" / "davis2016"),
                   help="DAVIS folder (JPEGImages, Annotations, ImageSets); default: the shared DAVIS-2016 subset")
    p.add_argument("--year", default="2016", choices=["2016", "2017"])
    p.add_argument("--split", default="val")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--sequences", default=None, help="comma-separated subset of the split's sequences")
    p.add_argument("--out", default=None,
                   help="results folder (default: davis_results/<backbone>_s<stride>_<year>_<split>)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="only the first N frames of each sequence (smoke runs; not the benchmark protocol)")
    p.add_argument("--recompute", action="store_true", help="propagate again even finished sequences")
    p.add_argument("--eval-only", action="store_true", help="score the masks already in --out; run no model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--unsupervised", action="store_true",
                   help="no first mask: discover the object in the first frame, score every frame (DAVIS-2016)")
    add_protocol_args(p)
    add_model_flags(p, stride="patch")
    add_discover_args(p, prefix="discover-", load_size=-1)
    return p


def settings_of(args: argparse.Namespace) -> Dict[str, object]:
    """Everything that changes the predicted masks."""
    keys = ("backbone", "weights", "stride", "dtype", "layer", "facet", "short_side", "multiple", "n_last_frames",
            "neighborhood", "topk", "temperature", "minmax_norm", "max_frames", "year")
    s = {k: getattr(args, k) for k in keys}
    if args.unsupervised:  # only then: semi-supervised folders keep their settings
        s["unsupervised"] = True
        s["discover"] = {k: v for k, v in vars(discovery_config(args)).items()}
    if s["weights"] not in (None, "random"):
        s["weights"] = str(Path(s["weights"]).resolve())
    s["provenance"] = weights_provenance(args.weights, args.backbone)     # backbone, file name, SHA-256
    return s


def run_sequence(extractor, ds: DavisDataset, seq: str, out: Path, cfg, max_frames: Optional[int],
                 progress: bool, discover_cfg=None) -> Dict[str, float]:
    """Propagate one sequence's first mask (or, with ``discover_cfg``, the object discovered in its first frame)
    and write its masks; returns timing."""
    frames = ds.frames(seq)[:max_frames]
    seq_dir = out / seq
    seq_dir.mkdir(parents=True, exist_ok=True)
    (seq_dir / DONE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    first = ds.first_mask(seq) if discover_cfg is None else discover_mask(extractor, frames[0], discover_cfg)
    with BackgroundWriter() as writer:
        for frame, mask in zip(frames, propagate(extractor, frames, first, cfg, progress=progress)):
            writer.submit(write_mask, seq_dir / f"{frame.stem}.png", mask)
    seconds = time.perf_counter() - t0
    info = {"frames": len(frames), "seconds": round(seconds, 3), "fps": round((len(frames) - 1) / seconds, 4)}
    atomic_write_text((seq_dir / DONE), json.dumps(info))
    return info


def evaluate_sequence(ds: DavisDataset, seq: str, out: Path, max_frames: Optional[int],
                      unsupervised: bool = False):
    """Per-object per-frame J and F of the masks in ``out/seq`` (``unsupervised``: every frame scored)."""
    gt, names = ds.ground_truth(seq)
    gt, names = gt[:max_frames], names[:max_frames]
    n_obj = int(gt[0].max())
    preds = []
    for name in names:
        path = out / seq / f"{name}.png"
        if not path.is_file():
            raise DensevitError(f"missing result mask {path}")
        preds.append(labels_for_year(read_mask(path), ds.year) if ds.year == "2016" else read_mask(path))
    return evaluate_semisupervised(gt, np.stack(preds), n_objects=n_obj, exclude_first_last=not unsupervised)


def write_csv(path: Path, columns: Sequence[str], rows: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([f"{r[c]:.3f}" if isinstance(r[c], float) else r[c] for c in columns])


def print_tables(split: str, g: Dict[str, float], rows: List[Dict[str, object]], timing: Dict[str, dict]) -> None:
    print(f"--------------------------- Global results for {split} ---------------------------")
    print(" ".join(f"{c:>9}" for c in GLOBAL_COLUMNS))
    print(" ".join(f"{g[c]:9.3f}" for c in GLOBAL_COLUMNS))
    print(f"\n---------- Per sequence results for {split} ----------")
    width = max([len("Sequence")] + [len(str(r["Sequence"])) for r in rows])
    print(f"{'Sequence':<{width}}  J-Mean  F-Mean   frames/s")
    for r in rows:
        t = timing.get(str(r["Sequence"]).rsplit("_", 1)[0], {})
        fps = f"{t['fps']:9.3f}" if "fps" in t else f"{'-':>9}"
        print(f"{r['Sequence']:<{width}}  {r['J-Mean']:6.3f}  {r['F-Mean']:6.3f}  {fps}")


def _main(argv: Optional[Sequence[str]], ctx: dist.DistContext) -> int:
    args = build_parser().parse_args(argv)
    args.device = ctx.device(args.device)
    cfg = config_from_args(args)
    if args.unsupervised and args.year != "2016":
        raise DensevitError("--unsupervised discovers one object: use it with --year 2016")
    discover_cfg = discovery_config(args) if args.unsupervised else None
    if args.max_frames is not None and args.max_frames < 3:
        raise DensevitError("--max-frames must be at least 3 (the first and last frames are not scored)")
    seqs = [s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences else None
    ds = DavisDataset(args.davis_root, args.year, args.split, args.resolution, seqs)
    stride = args.stride if args.stride is not None else "p"
    suffix = "_unsupervised" if args.unsupervised else ""
    out = Path(args.out or f"davis_results/{args.backbone}_s{stride}_{args.year}_{args.split}{suffix}")
    progress = not args.quiet

    timing: Dict[str, dict] = {}
    if not args.eval_only:
        def plan() -> List[List[str]]:
            check_settings(out, settings_of(args), args.recompute, lambda: list(out.glob(f"*/{DONE}")))
            todo = [s for s in ds.sequences if args.recompute or not (out / s / DONE).is_file()]
            n_frames = {s: len(ds.frames(s)[:args.max_frames]) for s in todo}
            return dist.deal(todo, [n_frames[s] for s in todo], ctx.world_size)

        mine = ctx.on_main(plan)[ctx.rank]
        extractor = None
        for i, seq in enumerate(mine):
            if extractor is None:
                extractor = build_extractor(args)
            if progress:
                rank = f"rank {ctx.rank}: " if ctx.world_size > 1 else ""
                print(f"{rank}[{i + 1}/{len(mine)}] {seq}", file=sys.stderr)
            run_sequence(extractor, ds, seq, out, cfg, args.max_frames, progress and ctx.is_main, discover_cfg)
        ctx.barrier()
        if not ctx.is_main:
            return 0
    elif not out.is_dir():
        raise DensevitError(f"no results folder {out} to evaluate")
    elif not ctx.is_main:
        return 0
    for seq in ds.sequences:
        done = out / seq / DONE
        if done.is_file():
            timing[seq] = json.loads(done.read_text())

    scores = DavisScores()
    for seq in ds.sequences:
        J, F = evaluate_sequence(ds, seq, out, args.max_frames, args.unsupervised)
        scores.add_sequence(seq, J, F)
    g = scores.global_row()
    rows = scores.per_object_rows()
    write_csv(out / f"global_results-{args.split}.csv", GLOBAL_COLUMNS, [g])
    write_csv(out / f"per-sequence_results-{args.split}.csv", SEQUENCE_COLUMNS, rows)
    split = f"{args.split} (unsupervised: {discover_cfg.method} on the first frame)" if args.unsupervised \
        else args.split
    print_tables(split, g, rows, timing)
    total_frames = sum(t["frames"] - 1 for t in timing.values())
    total_s = sum(t["seconds"] for t in timing.values())
    if total_s > 0:
        print(f"\npropagation: {total_frames} frames in {total_s:.1f} s ({total_frames / total_s:.3f} frames/s)")
    print(f"results in {out}")
    return 0


main = dist.main_with_session(_main)
entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
