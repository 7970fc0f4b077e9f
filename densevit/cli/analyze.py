"""densevit-analyze: attention heads, layer similarity (CKA), best layer per task, spatial information, occlusion
robustness and neuron visualisation, for one or more ViTs.

Writes PNG plots plus CSV/JSON numbers into the output folder:
  attention  <model>_attn_distance.png, <model>_attn_offset.png, <model>_attn_entropy.png,
             <model>_attn_cls_share.png, attn_distance_by_layer.png, <model>_attention.csv/.json
  cka        cka_<model>.png/.csv (all layers of one model), cka_<a>_vs_<b>.png/.csv (two models)
  sweep      sweep_<task>.png (score per layer, one line per model), sweep.csv, sweep.json
  spatial    <model>_spatial_maps.png, spatial_by_layer.png, <model>_spatial.csv/.json
  robustness <model>_robustness.png, <model>_robustness_layers.png, <model>_robustness.csv/.json
  neurons    <model>_neurons_<kind>_L<layer>.png, <model>_neurons.csv/.json
  summary.json  settings, offset local heads, best layers, and the list of files written.
Models: the one chosen by --backbone/--weights, plus any --compare BACKBONE[=WEIGHTS] (same images, same flags).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import DensevitError
from ..eval.analysis.neurons import MAX_SIZE, MAX_STEPS, UNIT_KINDS
from ..eval.analysis.robustness import DEFAULT_RATIOS, DROP_MODES, OCCLUSIONS
from ..eval.analysis.sweep import SWEEP_FACETS
from ..io.files import atomic_write_text, check_outputs
from ..io.images import drop_unreadable, gather_images, report_unreadable
from ..options import opt
from .analyze_methods import _json, _slug, check_method_args, method_files, run_methods
from .common import OutputOptions, add_backbone_args, run_cli
from .flags import add_config_flags, make_parser

ANALYSES = ("attention", "cka", "sweep", "spatial", "robustness", "neurons")
DAVIS_YEARS = ("2016", "2017")


@dataclass(frozen=True)
class AnalyzeOptions:
    """What densevit-analyze runs, on which models, images and layers."""

    images: Tuple[str, ...] = opt((), "image files and/or folders of images (the analysis set)", positional=True,
                                  nargs="+")
    analyses: Tuple[str, ...] = opt(("attention", "cka"), "what to run (sweep needs task data)", choices=ANALYSES)
    compare: Tuple[str, ...] = opt((), "another model to analyse side by side (repeatable); WEIGHTS: file or "
                                       "'random'", action="append", metavar="BACKBONE[=WEIGHTS]", nargs=None,
                                   type=str)
    layers: Optional[Tuple[int, ...]] = opt(None, "blocks to analyse (default: all)")
    max_images: Optional[int] = opt(None, "use at most this many images")
    radius: int = opt(2, "largest |dy|, |dx| of candidate offsets (tokens)", group="attention")
    threshold: float = opt(0.5, "offset local head: dominant offset fraction at least this", group="attention")
    cka_facet: str = opt("token", "representation compared", choices=SWEEP_FACETS, group="cka")
    cka_max_tokens: int = opt(1024, "tokens sampled per image (one minibatch)", group="cka")
    biased: bool = opt(False, "biased HSIC (default: unbiased HSIC_1)", negatable=False, group="cka")
    tasks: Optional[Tuple[str, ...]] = opt(None, "tasks to sweep (default: all available)", metavar="TASK",
                                           group="sweep")
    sweep_facets: Tuple[str, ...] = opt(("key",), "facets swept", choices=SWEEP_FACETS, group="sweep")
    warp_pairs: Optional[int] = opt(None, "warp_pck: synthetic warp pairs of the input images (default: 2 per "
                                          "image)", group="sweep")
    davis_root: Optional[str] = opt(None, "DAVIS folder (default: <shared>/data/davis2016)", group="sweep")
    davis_year: str = opt("2016", "DAVIS release", choices=DAVIS_YEARS, group="sweep")
    davis_sequences: Optional[Tuple[str, ...]] = opt(None, "DAVIS sequences (default: the first)", group="sweep")
    davis_frames: int = opt(6, "frames per DAVIS sequence", group="sweep")
    seed: int = opt(0, "seed of the sweep's sampling (and of robustness / neurons)", group="sweep")
    spatial_queries: int = opt(3, "query tokens per side in the map grid (images run at LOAD_SIZE x LOAD_SIZE)",
                               group="spatial")
    drop_ratios: Tuple[float, ...] = opt(DEFAULT_RATIOS, "shares of patches dropped, each in [0, 1)",
                                         group="robustness")
    drop_modes: Tuple[str, ...] = opt(DROP_MODES, "which patches go first", choices=DROP_MODES, group="robustness")
    occlusions: Tuple[str, ...] = opt(OCCLUSIONS, "mask the pixels and/or drop the tokens", choices=OCCLUSIONS,
                                      group="robustness")
    classifier_head: Optional[str] = opt(None, "linear head (weight/bias state dict) on the final-normed CLS: "
                                               "top-1 accuracy, each image labelled by its folder's name (a class "
                                               "index)", metavar="FILE", group="robustness")
    neuron_layers: Optional[Tuple[int, ...]] = opt(None, "blocks whose units are visualised (default: first, middle, "
                                                         "last)", group="neurons")
    neuron_kind: str = opt("mlp", "feed-forward hidden units or a facet's channels", choices=UNIT_KINDS,
                           group="neurons")
    units: Optional[Tuple[int, ...]] = opt(None, "units to visualise (default: the first --neuron-count)",
                                           group="neurons")
    neuron_count: int = opt(8, "units per layer when --units is not given", group="neurons")
    neuron_steps: int = opt(100, f"optimisation steps per unit (at most {MAX_STEPS})", group="neurons")
    neuron_size: int = opt(128, f"image side in pixels (at most {MAX_SIZE})", group="neurons")
    neuron_ensemble: int = opt(4, "augmented copies averaged per step", group="neurons")
    neuron_jitter: int = opt(8, "largest random shift (pixels) per copy", group="neurons")
    neuron_lr: float = opt(0.05, "Adam learning rate", group="neurons")


def build_parser() -> argparse.ArgumentParser:
    from ..eval.analysis.sweep import known_tasks

    p = make_parser("densevit-analyze", __doc__)
    groups = {}
    for name, f in AnalyzeOptions.__dataclass_fields__.items():
        groups.setdefault(f.metadata.get("group"), []).append(name)
    add_config_flags(p, AnalyzeOptions, only=groups[None][:2], defaults={"analyses": ["attention", "cka"]})
    add_config_flags(p, OutputOptions, only=["out"])
    add_backbone_args(p, stride="patch", load_size=224, layer=None, facet=None)
    add_config_flags(p, AnalyzeOptions, only=groups[None][2:], defaults={"compare": []})
    tasks_help = f"tasks to sweep (known: {', '.join(known_tasks()) or 'none'}; default: all available)"
    for title in ("attention", "cka", "sweep", "spatial", "robustness", "neurons"):
        add_config_flags(p, AnalyzeOptions, only=groups[title], title=title, tweak={"tasks": {"help": tasks_help}},
                         defaults={"sweep_facets": ["key"], "drop_ratios": list(DEFAULT_RATIOS),
                                   "drop_modes": list(DROP_MODES), "occlusions": list(OCCLUSIONS)})
    add_config_flags(p, OutputOptions, only=["overwrite", "quiet"],
                     tweak={"quiet": {"help": "no progress bars", "aliases": ("--no-progress",)}})
    return p


def _parse_models(args: argparse.Namespace) -> List[Tuple[str, str, Optional[str]]]:
    """``[(label, backbone, weights)]``: the main model then every --compare."""
    from ..models.registry import get_spec

    models = [(args.backbone, args.weights)]
    for item in args.compare:
        name, _, weights = item.partition("=")
        models.append((name.strip(), weights.strip() or None))
    out, seen = [], {}
    for name, weights in models:
        name = get_spec(name).name            # a Hub id is an alias; unknown names: a one-line error
        label = name if weights in (None, "") else f"{name}-{'random' if weights == 'random' else Path(weights).stem}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        out.append((label, name, weights))
    return out


def _planned_files(args, labels: List[str], tasks: List[str]) -> List[Path]:
    out = Path(args.out)
    files = [out / "summary.json"]
    slugs = [_slug(l) for l in labels]
    if "attention" in args.analyses:
        for s in slugs:
            files += [out / f"{s}_attn_{k}.png" for k in ("distance", "offset", "entropy", "cls_share")]
            files += [out / f"{s}_attention.csv", out / f"{s}_attention.json"]
        files.append(out / "attn_distance_by_layer.png")
    if "cka" in args.analyses:
        for i, a in enumerate(slugs):
            files += [out / f"cka_{a}.png", out / f"cka_{a}.csv"]
            for b in slugs[i + 1:]:
                files += [out / f"cka_{a}_vs_{b}.png", out / f"cka_{a}_vs_{b}.csv"]
    if "sweep" in args.analyses:
        files += [out / "sweep.csv", out / "sweep.json"] + [out / f"sweep_{t}.png" for t in tasks]
    files += method_files(args, out, _parse_models(args))
    return files


def _write_csv(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    if not rows:
        return
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, f.getvalue())


def _write_matrix_csv(path: Path, m, rows: Sequence[int], cols: Sequence[int], row_name: str, col_name: str) -> None:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow([f"{row_name}\\{col_name}"] + [str(c) for c in cols])
    for r, vals in zip(rows, m):
        w.writerow([str(r)] + [f"{v:.6f}" for v in vals])
    atomic_write_text(path, f.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..eval.analysis import attention as att
    from ..eval.analysis import cka as ck
    from ..eval.analysis import plots
    from ..eval.analysis import sweep as sw
    from ..features.extractor import ViTExtractor
    from ..io.paths import shared_dir
    from ..models.registry import get_spec

    images = gather_images(args.images)
    if args.max_images is not None:
        if args.max_images < 1:
            raise DensevitError("--max-images must be at least 1")
        images = images[: args.max_images]
    if args.radius < 1:
        raise DensevitError("--radius must be at least 1")
    if not 0.0 < args.threshold <= 1.0:
        raise DensevitError("--threshold must be in (0, 1]")
    models = _parse_models(args)
    min_side = max(get_spec(name).patch_size for _, name, _ in models)    # every model reads every image
    images, unreadable = drop_unreadable("densevit-analyze", images, min_side=min_side)
    if not images:
        raise DensevitError("no readable input image")
    labels = [m[0] for m in models]
    tasks: List[str] = []
    if "sweep" in args.analyses:
        avail = sw.available_tasks()
        tasks = list(args.tasks) if args.tasks else avail
        if not tasks:
            raise DensevitError("no sweep task is available in this installation (needs "
                                + ", ".join(sorted({m for m, _ in sw._task_builders().values()})) + ")")
        for t in tasks:
            if t not in sw.known_tasks():
                raise DensevitError(f"unknown task {t!r}; choose from {', '.join(sw.known_tasks())}")
            if t not in avail:
                raise DensevitError(f"task {t} is not available in this installation")
    for _, name, _ in models:                         # layer indices checked before any work
        att.resolve_layers(get_spec(name).depth, args.layers)
    check_method_args(args, models, images)
    task_objs = []
    if tasks:                                         # tasks read their data now: bad paths fail early
        if args.warp_pairs is not None and args.warp_pairs < 1:
            raise DensevitError("--warp-pairs must be at least 1")
        davis_root = Path(args.davis_root) if args.davis_root else shared_dir() / "data" / "davis2016"
        options = dict(images=images, load_size=args.load_size, num_pairs=args.warp_pairs, davis_root=davis_root,
                       davis_year=args.davis_year, davis_sequences=args.davis_sequences,
                       davis_frames=args.davis_frames, seed=args.seed)
        task_objs = [sw.build_task(t, **options) for t in tasks]
    out_dir = Path(args.out)
    inputs = list(args.images) + ([str(davis_root)] if tasks else [])
    check_outputs(inputs, folders=[out_dir], files=_planned_files(args, labels, tasks), overwrite=args.overwrite)
    # every model built once, before any output (bad weights/stride fail early); CKA needs them side by side
    built: Dict[str, ViTExtractor] = {
        label: ViTExtractor(name, stride=args.stride, weights=weights, device=args.device, dtype=args.dtype)
        for label, name, weights in models}
    build = built.__getitem__
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    written: List[Path] = []
    summary: Dict[str, object] = {
        "images": [str(p) for p in images], "models": [{"label": l, "backbone": b, "weights": w} for l, b, w in models],
        "load_size": args.load_size, "stride": args.stride, "analyses": list(args.analyses),
    }

    if "attention" in args.analyses:
        all_stats = {}
        summary["attention"] = {}
        for label in labels:
            ext = build(label)
            st = att.attention_stats(ext, images, load_size=args.load_size, layers=args.layers, radius=args.radius,
                                     threshold=args.threshold, progress=progress, desc=f"attention {label}")
            all_stats[label] = st
            s = _slug(label)
            written += plots.plot_attention_stats(st, out_dir, prefix=f"{s}_").values()
            _write_csv(out_dir / f"{s}_attention.csv", st.records())
            atomic_write_text(out_dir / f"{s}_attention.json", _json(st.to_json()))
            written += [out_dir / f"{s}_attention.csv", out_dir / f"{s}_attention.json"]
            heads = st.offset_head_list()
            summary["attention"][label] = {"offset_heads": heads,
                                           "mean_distance_per_layer": st.mean_distance.mean(1).round(4).tolist()}
            msg = ", ".join(f"L{h['layer']}H{h['head']} ({h['dy']},{h['dx']}) {h['fraction']:.2f}" for h in heads)
            print(f"{label}: {len(heads)} offset local head(s){': ' + msg if heads else ''}")
        written.append(plots.plot_distance_by_layer(all_stats, out_dir / "attn_distance_by_layer.png"))

    if "cka" in args.analyses:
        exts = [build(label) for label in labels]
        lay = [att.resolve_layers(e.depth, args.layers) for e in exts]
        res = ck.model_cka(exts, images, load_size=args.load_size, facet=args.cka_facet, layers=lay,
                           max_tokens=args.cka_max_tokens, unbiased=not args.biased, seed=args.seed,
                           progress=progress)
        summary["cka"] = {"facet": args.cka_facet, "unbiased": not args.biased, "matrices": {}}
        for (i, j), m in res.items():
            a, b = _slug(labels[i]), _slug(labels[j])
            stem = f"cka_{a}" if i == j else f"cka_{a}_vs_{b}"
            written.append(plots.plot_cka(m, lay[i], lay[j], out_dir / f"{stem}.png", label_a=labels[i],
                                          label_b=labels[j]))
            _write_matrix_csv(out_dir / f"{stem}.csv", m, lay[i], lay[j], labels[i], labels[j])
            written.append(out_dir / f"{stem}.csv")
            summary["cka"]["matrices"][stem] = m.round(6).tolist()

    if "sweep" in args.analyses:
        sources = [(label, (lambda l=label: build(l))) for label in labels]
        records = sw.run_sweep(sources, task_objs, layers=args.layers, facets=args.sweep_facets, progress=progress)
        _write_csv(out_dir / "sweep.csv", records)
        best = sw.best_layers(records)
        atomic_write_text(out_dir / "sweep.json", _json({"records": records, "best": best}))
        written += [out_dir / "sweep.csv", out_dir / "sweep.json"]
        for t in tasks:
            written.append(plots.plot_sweep(records, t, out_dir / f"sweep_{t}.png"))
        summary["sweep"] = {"best": best}
        for b in best:
            print(f"{b['model']} {b['task']} ({b['facet']}): best layer {b['layer']} score {b['score']:.4f}")

    written += run_methods(args, built, images, out_dir, summary, progress)

    summary["files"] = sorted(p.name for p in written) + ["summary.json"]
    atomic_write_text(out_dir / "summary.json", _json(summary))
    print(f"densevit-analyze: wrote {len(written) + 1} files to {out_dir}", file=sys.stderr)
    return report_unreadable("densevit-analyze", unreadable)


entry = run_cli(main, "densevit-analyze")

if __name__ == "__main__":
    entry()
