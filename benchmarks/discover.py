"""Single-frame object discovery on DAVIS-2016: CorLoc and mask J of TokenCut / LOST on every annotated frame.

    python benchmarks/discover.py [--davis-root ROOT] [--methods tokencut,lost] [--load-size 160] [--out DIR]

Every frame of every sequence (one primary object each) is a separate image: the object is discovered with no
label (:mod:`densevit.apps.discovery`; the methods share one forward pass a frame) and scored against the frame's ground-truth mask -- **CorLoc**: the
discovered box has IoU >= 0.5 with the box of the ground-truth mask (boxes with exclusive maxima); **mask J**:
IoU of the discovered mask with the ground-truth mask (1 when both are empty). Frames whose ground truth is
empty are left out of CorLoc.

Writes ``OUT/records.jsonl`` (one line a frame), ``OUT/discover_results.csv`` (per sequence and over all frames)
and ``OUT/settings.json``, and prints the table; ``--save-masks`` also writes ``OUT/masks/<method>/<seq>/<frame>.png``.
Resumable: frames already in ``records.jsonl`` are skipped; a folder holding results of other settings is
refused unless ``--recompute`` (which starts it over).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from densevit.models.provenance import weights_provenance
from densevit.apps.cli.discover import add_discover_args, config_from_args
from densevit.apps.discovery.core import (
    METHODS,
    box_iou,
    discover_features,
    extract_discovery_features,
    mask_box,
)

from densevit.cli.common import add_model_flags, build_extractor, run_cli
from densevit.errors import DensevitError
from densevit.eval.datasets.davis import DavisDataset, write_mask
from densevit.eval.metrics.davis import db_eval_iou
from densevit.io.paths import shared_dir
from densevit.io.files import atomic_write_text

PROG = "benchmarks/discover.py"
COLUMNS = ("Method", "Sequence", "Frames", "CorLoc", "J-Mean", "J-Recall")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="CorLoc and mask J of label-free object discovery on "
                                "every DAVIS-2016 frame.")
    p.add_argument("--davis-root", default=str(shared_dir() / "data" / "davis2016"),
                   help="DAVIS-2016 folder (JPEGImages, Annotations, ImageSets); default: the shared subset")
    p.add_argument("--split", default="val")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--sequences", default=None, help="comma-separated subset of the split's sequences")
    p.add_argument("--max-frames", type=int, default=None, help="only the first N frames of each sequence")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: both)")
    p.add_argument("--out", default=None, help="results folder (default: discover_results/<backbone>_"
                   "s<stride>_l<load size>)")
    p.add_argument("--save-masks", action="store_true", help="also write the discovered masks (0/1 PNGs)")
    p.add_argument("--recompute", action="store_true", help="start over (also when the settings changed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_discover_args(p, method=False)
    add_model_flags(p, stride="patch", backbone="dino_vits16")
    return p


def settings_of(args: argparse.Namespace, cfg) -> Dict[str, object]:
    """Everything that changes the results."""
    s = {"benchmark": "davis2016-discovery", "backbone": args.backbone, "weights": args.weights,
         "stride": args.stride, "dtype": args.dtype, "max_frames": args.max_frames,
         **{k: v for k, v in vars(cfg).items() if k != "method"}}
    if s["weights"] not in (None, "random"):
        s["weights"] = str(Path(s["weights"]).resolve())
    s["provenance"] = weights_provenance(args.weights, args.backbone)     # backbone, file name, SHA-256
    return s


def open_records(out: Path, settings: Dict[str, object], recompute: bool) -> Dict[str, dict]:
    """The records of earlier runs with the same settings (``seq/frame`` -> record); refuses other settings."""
    path, records = out / "records.jsonl", {}
    settings_path = out / "settings.json"
    if settings_path.is_file() and not recompute:
        old = json.loads(settings_path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise DensevitError(f"{out} holds results of other settings ({', '.join(diff)}); "
                                f"use another --out or --recompute")
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    records[f"{r['method']}/{r['sequence']}/{r['frame']}"] = r
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interrupted run
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings, indent=1) + "\n")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records.values()))
    return records


def score_frame(pred_mask: np.ndarray, pred_box, gt: np.ndarray) -> Dict[str, object]:
    """CorLoc hit, box IoU and mask J of one frame."""
    gt_box = mask_box(gt)
    iou = box_iou(pred_box, gt_box) if gt_box is not None else None
    return {"box_iou": None if iou is None else round(iou, 5),
            "corloc": None if iou is None else bool(iou >= 0.5),
            "J": round(float(db_eval_iou(gt, pred_mask)), 5), "gt_box": gt_box}


def summarise(records: List[dict], sequences: Sequence[str], method: str) -> List[Dict[str, object]]:
    """Rows of one method per sequence and over all frames: frames, CorLoc (%), mean J, J recall (J > 0.5)."""
    records = [r for r in records if r["method"] == method]

    def row(name: str, rs: List[dict]) -> Dict[str, object]:
        hits = [r["corloc"] for r in rs if r["corloc"] is not None]
        J = np.array([r["J"] for r in rs], np.float64)
        return {"Method": method, "Sequence": name, "Frames": len(rs),
                "CorLoc": 100.0 * float(np.mean(hits)) if hits else float("nan"),
                "J-Mean": float(J.mean()) if len(J) else float("nan"),
                "J-Recall": float((J > 0.5).mean()) if len(J) else float("nan")}

    rows = [row(s, [r for r in records if r["sequence"] == s]) for s in sequences]
    return rows + [row("all frames", records)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise DensevitError(f"--methods must list some of {', '.join(METHODS)}")
    if args.max_frames is not None and args.max_frames < 1:
        raise DensevitError("--max-frames must be at least 1")
    seqs = [s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences else None
    ds = DavisDataset(args.davis_root, "2016", args.split, args.resolution, seqs)
    stride = args.stride if args.stride is not None else "p"
    out = Path(args.out or f"discover_results/{args.backbone}_s{stride}_l{cfg.load_size or 'orig'}")
    records = open_records(out, settings_of(args, cfg), args.recompute)

    todo = []
    for seq in ds.sequences:
        frames = ds.frames(seq)[:args.max_frames]
        for f in frames:
            missing = [m for m in methods if f"{m}/{seq}/{f.stem}" not in records]
            if missing:
                todo.append((seq, f, missing))
    if todo:
        from tqdm import tqdm

        extractor = build_extractor(args)
        gts: Dict[str, np.ndarray] = {}
        with open(out / "records.jsonl", "a") as log:
            for seq, frame, missing in tqdm(todo, desc="discovery", unit="frame", disable=args.quiet or None,
                                      file=sys.stderr):
                if seq not in gts:
                    masks, names = ds.ground_truth(seq)
                    gts = {seq: dict(zip(names, masks))}
                if frame.stem not in gts[seq]:
                    raise DensevitError(f"no ground-truth mask for frame {frame.stem} of {seq}")
                t0 = time.perf_counter()
                feats = extract_discovery_features(extractor, frame, cfg)
                t_extract = time.perf_counter() - t0
                for m in missing:
                    t0 = time.perf_counter()
                    r = discover_features(feats, replace(cfg, method=m))
                    rec = {"method": m, "sequence": seq, "frame": frame.stem, "box": [round(c, 2) for c in r.box],
                           **score_frame(r.mask, r.box, gts[seq][frame.stem] > 0),
                           "seed_xy": [round(c, 2) for c in r.seed_xy], "extract_seconds": round(t_extract, 3),
                           "method_seconds": round(time.perf_counter() - t0, 3)}
                    if args.save_masks:
                        write_mask(out / "masks" / m / seq / f"{frame.stem}.png", r.mask.astype(np.uint8))
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    records[f"{m}/{seq}/{frame.stem}"] = rec

    wanted = {f"{m}/{s}/{f.stem}" for m in methods for s in ds.sequences for f in ds.frames(s)[:args.max_frames]}
    kept = [r for k, r in records.items() if k in wanted]
    rows = [row for m in methods for row in summarise(kept, ds.sequences, m)]
    with open(out / "discover_results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([f"{r[c]:.3f}" if isinstance(r[c], float) else r[c] for c in COLUMNS])
    print(f"---------- object discovery on DAVIS-2016 {args.split} ({args.backbone}, "
          f"load size {cfg.load_size or 'original'}) ----------")
    width = max(len(str(r["Sequence"])) for r in rows)
    print(f"{'Method':<9} {'Sequence':<{width}}  Frames  CorLoc %  J-Mean  J-Recall")
    for r in rows:
        print(f"{r['Method']:<9} {r['Sequence']:<{width}}  {r['Frames']:6d}  {r['CorLoc']:8.1f}  {r['J-Mean']:6.3f}  "
              f"{r['J-Recall']:8.3f}")
    for m in methods:
        secs = [r["method_seconds"] for r in kept if r["method"] == m]
        if secs:
            print(f"{m}: {len(secs)} frames, {np.mean(secs):.3f} s a frame after extraction")
    print(f"results in {out}")
    return 0


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
