"""Compare two DAVIS result folders mask by mask (e.g. the same propagation run in bfloat16 and in float32).

    python benchmarks/davis.py --dtype float32  --out runs/fp32 ...
    python benchmarks/davis.py --dtype bfloat16 --out runs/bf16 ...
    python benchmarks/compare_masks.py runs/fp32 runs/bf16 [--require 0.99]

For every sequence found in both folders it reports the fraction of pixels whose object id agrees, over the
frames after the first (the first mask is the given annotation), and, where both folders hold the global
results CSV written by ``benchmarks/davis.py``, the difference in J&F, J and F. Prints a table and writes
``--out`` (JSON). ``--require`` exits with status 1 when the overall agreement is below that fraction.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from densevit.cli.common import run_cli
from densevit.errors import DensevitError
from densevit.eval.datasets.davis import read_mask
from densevit.io.files import atomic_write_text

PROG = "benchmarks/compare_masks.py"


def sequence_agreement(a_dir: Path, b_dir: Path) -> Dict[str, float]:
    """Pixel agreement of the masks of one sequence in two folders (frames after the first, by file name)."""
    names = sorted(p.name for p in a_dir.glob("*.png"))
    missing = [n for n in names if not (b_dir / n).is_file()]
    if not names or missing:
        raise DensevitError(f"{b_dir} lacks {len(missing)} of the {len(names)} masks in {a_dir}"
                            if names else f"no masks in {a_dir}")
    same = total = 0
    worst = 1.0
    for n in names[1:]:
        a, b = read_mask(a_dir / n), read_mask(b_dir / n)
        if a.shape != b.shape:
            raise DensevitError(f"{n} of {a_dir.name} is {a.shape[1]}x{a.shape[0]} in one folder and "
                                f"{b.shape[1]}x{b.shape[0]} in the other")
        eq = int((a == b).sum())
        same, total = same + eq, total + a.size
        worst = min(worst, eq / a.size)
    return {"frames": len(names) - 1, "pixels": total, "agree": same / total if total else 1.0,
            "worst_frame": worst}


def global_scores(folder: Path) -> Optional[Dict[str, float]]:
    """The global results row written by ``benchmarks/davis.py`` (any split), or None."""
    files = sorted(folder.glob("global_results-*.csv"))
    if not files:
        return None
    with open(files[0], newline="") as f:
        row = next(csv.DictReader(f))
    return {k: float(v) for k, v in row.items()}


def compare(a: Path, b: Path) -> Dict[str, object]:
    """Per-sequence and overall (pixel-weighted) agreement, and the global scores of both folders."""
    for d in (a, b):
        if not d.is_dir():
            raise DensevitError(f"no results folder {d}")
    seqs = sorted(p.name for p in a.iterdir() if p.is_dir() and (b / p.name).is_dir() and any(p.glob("*.png")))
    if not seqs:
        raise DensevitError(f"{a} and {b} hold no sequence folders in common")
    per = {s: sequence_agreement(a / s, b / s) for s in seqs}
    pixels = sum(r["pixels"] for r in per.values())
    overall = sum(r["agree"] * r["pixels"] for r in per.values()) / pixels if pixels else 1.0
    return {"a": str(a), "b": str(b), "sequences": per, "agree": overall,
            "scores": {"a": global_scores(a), "b": global_scores(b)}}


def format_report(res: Dict[str, object]) -> str:
    per: Dict[str, Dict[str, float]] = res["sequences"]  # type: ignore[assignment]
    width = max(len("sequence"), *(len(s) for s in per))
    lines = [f"a: {res['a']}", f"b: {res['b']}", "",
             f"{'sequence':<{width}}  frames  agree %  worst frame %"]
    for s, r in per.items():
        lines.append(f"{s:<{width}}  {r['frames']:6d}  {100 * r['agree']:7.3f}  {100 * r['worst_frame']:13.3f}")
    lines.append(f"{'all':<{width}}  {sum(r['frames'] for r in per.values()):6d}  {100 * res['agree']:7.3f}")
    sa, sb = res["scores"]["a"], res["scores"]["b"]  # type: ignore[index]
    if sa and sb:
        lines.append("")
        lines.append(f"{'':10s} {'a':>8s} {'b':>8s} {'b - a':>8s}")
        for k in ("J&F-Mean", "J-Mean", "F-Mean"):
            if k in sa and k in sb:
                lines.append(f"{k:10s} {sa[k]:8.3f} {sb[k]:8.3f} {sb[k] - sa[k]:+8.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Pixel agreement of two DAVIS result folders.")
    p.add_argument("a", help="first results folder (OUT/<sequence>/<frame>.png)")
    p.add_argument("b", help="second results folder")
    p.add_argument("--out", default=None, help="JSON file for the report (default: B/agreement.json)")
    p.add_argument("--require", type=float, default=None,
                   help="exit with status 1 when the overall agreement is below this fraction")
    args = p.parse_args(argv)
    res = compare(Path(args.a), Path(args.b))
    print(format_report(res))
    out = Path(args.out) if args.out else Path(args.b) / "agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=1))
    print(f"\nwrote {out}")
    if args.require is not None and res["agree"] < args.require:  # type: ignore[operator]
        print(f"agreement {100 * res['agree']:.3f}% is below the required {100 * args.require:.3f}%",
              file=sys.stderr)
        return 1
    return 0


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
