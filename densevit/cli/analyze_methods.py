"""densevit-analyze's spatial-information, occlusion-robustness and neuron-visualisation analyses: their checks,
planned files and runs (the algorithms live in :mod:`densevit.eval.analysis`)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import DensevitError
from ..io.files import atomic_write

METHODS = ("spatial", "robustness", "neurons")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def _json(obj) -> str:
    """Strict JSON (NaN and infinities written as null)."""
    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=1, allow_nan=False)




def _neuron_layers(args: argparse.Namespace, depth: int) -> List[int]:
    from ..eval.analysis.attention import resolve_layers

    if args.neuron_layers is None:
        return sorted({0, depth // 2, depth - 1})
    return resolve_layers(depth, args.neuron_layers)


def _image_labels(images: Sequence[Path]) -> List[int]:
    """Each image's class index: the name of its folder (an ImageNet-style labelled folder)."""
    out = []
    for p in images:
        name = Path(p).parent.name
        if not name.isdigit():
            raise DensevitError(f"--classifier-head needs images in folders named by class index; {p} lies in "
                                f"{name!r}")
        out.append(int(name))
    return out


def check_method_args(args: argparse.Namespace, models, images) -> None:
    """One-line errors for bad flags of the three analyses, before any model is built."""
    from ..eval.analysis.neurons import MAX_SIZE, MAX_STEPS
    from ..models.registry import get_spec

    if "spatial" in args.analyses and args.spatial_queries < 1:
        raise DensevitError("--spatial-queries must be at least 1")
    if "robustness" in args.analyses:
        for r in args.drop_ratios:
            if not 0.0 <= r < 1.0:
                raise DensevitError(f"--drop-ratios must lie in [0, 1), got {r}")
        if args.stride is not None:
            for _, name, _ in models:
                if int(args.stride) != get_spec(name).patch_size:
                    raise DensevitError(f"robustness runs at the patch stride; {name} has patch "
                                        f"{get_spec(name).patch_size}, --stride is {args.stride}")
        if args.classifier_head is not None:
            if not Path(args.classifier_head).is_file():
                raise DensevitError(f"--classifier-head {args.classifier_head} is not a file")
            _image_labels(images)
    if "neurons" in args.analyses:
        if not 1 <= args.neuron_steps <= MAX_STEPS:
            raise DensevitError(f"--neuron-steps must be in 1..{MAX_STEPS}")
        if not 16 <= args.neuron_size <= MAX_SIZE:
            raise DensevitError(f"--neuron-size must be in 16..{MAX_SIZE}")
        if args.neuron_count < 1 or args.neuron_ensemble < 1 or args.neuron_jitter < 0 or args.neuron_lr <= 0:
            raise DensevitError("--neuron-count and --neuron-ensemble must be at least 1, --neuron-jitter at least 0, "
                                "--neuron-lr positive")
        for _, name, _ in models:
            spec = get_spec(name)
            _neuron_layers(args, spec.depth)
            if args.units is not None:
                n = spec.embed_dim
                if args.neuron_kind == "mlp":             # the hidden width, from the architecture (no weights)
                    from ..models.weights import create_model

                    n = int(create_model(spec, "meta").blocks[0].mlp.fc2.in_features)
                bad = [u for u in args.units if not 0 <= u < n]
                if bad:
                    raise DensevitError(f"--units {bad[0]} out of range for {args.neuron_kind} of {name} (0..{n - 1})")


def method_files(args: argparse.Namespace, out: Path, models) -> List[Path]:
    """The files the three analyses will write (checked before any work)."""
    from ..models.registry import get_spec
    files: List[Path] = []
    slugs = [(_slug(label), get_spec(name)) for label, name, _ in models]
    if "spatial" in args.analyses:
        for s, _ in slugs:
            files += [out / f"{s}_spatial_maps.png", out / f"{s}_spatial.csv", out / f"{s}_spatial.json"]
        files.append(out / "spatial_by_layer.png")
    if "robustness" in args.analyses:
        for s, _ in slugs:
            files += [out / f"{s}_robustness{k}" for k in (".png", "_layers.png", ".csv", ".json")]
    if "neurons" in args.analyses:
        for s, spec in slugs:
            files += [out / f"{s}_neurons_{args.neuron_kind}_L{l}.png" for l in _neuron_layers(args, spec.depth)]
            files += [out / f"{s}_neurons.csv", out / f"{s}_neurons.json"]
    return files


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def _write_rows(path: Path, rows: Sequence[Dict[str, object]]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    w.writeheader()
    w.writerows(rows)
    return _write_text(path, buf.getvalue())


def run_methods(args: argparse.Namespace, built: Dict[str, object], images: Sequence[Path], out_dir: Path,
                summary: Dict[str, object], progress: bool) -> List[Path]:
    """Run the requested analyses of :data:`METHODS` on every model; returns the files written."""
    from ..eval.analysis import plots_methods as mp
    from ..eval.analysis.neurons import default_units, visualize_units
    from ..eval.analysis.robustness import linear_classifier, occlusion_robustness
    from ..eval.analysis.spatial import spatial_information
    written: List[Path] = []
    load = int(args.load_size or 224)
    if "spatial" in args.analyses:
        stats = {}
        summary["spatial"] = {}
        for label, ext in built.items():
            st = spatial_information(ext, images, load_size=load, layers=args.layers,
                                     queries_per_side=args.spatial_queries, progress=progress,
                                     desc=f"spatial {label}")
            stats[label] = st
            s = _slug(label)
            written.append(mp.plot_spatial_maps(st, out_dir / f"{s}_spatial_maps.png"))
            written.append(_write_rows(out_dir / f"{s}_spatial.csv", st.records()))
            written.append(_write_text(out_dir / f"{s}_spatial.json", _json(st.to_json())))
            summary["spatial"][label] = {"own_share": [round(float(v), 4) for v in st.own_share]}
            print(f"{label}: share of tokens nearest their own input position per layer: "
                  + " ".join(f"{v:.2f}" for v in st.own_share))
        written.append(mp.plot_spatial_summary(stats, out_dir / "spatial_by_layer.png"))
    if "robustness" in args.analyses:
        summary["robustness"] = {}
        labels: Optional[List[int]] = _image_labels(images) if args.classifier_head else None
        for label, ext in built.items():
            head = linear_classifier(args.classifier_head, ext) if args.classifier_head else None
            st = occlusion_robustness(ext, images, load_size=load, layers=args.layers, ratios=args.drop_ratios,
                                      modes=args.drop_modes, occlusions=args.occlusions, classifier=head,
                                      labels=labels, seed=args.seed, progress=progress, desc=f"robustness {label}")
            s = _slug(label)
            written.append(mp.plot_robustness(st, out_dir / f"{s}_robustness.png"))
            written.append(mp.plot_robustness_layers(st, out_dir / f"{s}_robustness_layers.png"))
            written.append(_write_rows(out_dir / f"{s}_robustness.csv", st.records()))
            written.append(_write_text(out_dir / f"{s}_robustness.json", _json(st.to_json())))
            summary["robustness"][label] = {"clean_top1": st.meta.get("clean_top1")}
    if "neurons" in args.analyses:
        summary["neurons"] = {}
        for label, ext in built.items():
            s = _slug(label)
            rows = []
            for layer in _neuron_layers(args, ext.depth):
                units = list(args.units) if args.units is not None else default_units(ext, layer, args.neuron_kind,
                                                                                     args.neuron_count)
                items = visualize_units(ext, layer, args.neuron_kind, units, progress=progress, size=args.neuron_size,
                                        steps=args.neuron_steps, lr=args.neuron_lr, ensemble=args.neuron_ensemble,
                                        jitter=args.neuron_jitter, seed=args.seed)
                written.append(mp.plot_neurons(items, out_dir / f"{s}_neurons_{args.neuron_kind}_L{layer}.png",
                                               title=f"{label}: layer {layer} {args.neuron_kind} units "
                                                     f"(activation before -> after)"))
                rows += [{"layer": it.layer, "kind": it.kind, "unit": it.unit, "activation_start": it.start,
                          "activation_end": it.end} for it in items]
            written.append(_write_rows(out_dir / f"{s}_neurons.csv", rows))
            written.append(_write_text(out_dir / f"{s}_neurons.json", _json({"units": rows})))
            summary["neurons"][label] = {"raised": sum(r["activation_end"] > r["activation_start"] for r in rows),
                                         "units": len(rows)}
    return written
