"""Click latency of densevit-explore, server side: after the first extraction, how long one click takes to give
every image's similarity map, top-k matches and best buddies (``compute``), and with the page's response encoding
(``response``: maps as base64 float32 + JSON).

    python benchmarks/explore_latency.py [--images 2 8] [--stride 4] [--load-size 224] [--layer 9] [--bin]
                                         [--clicks 50] [--device cpu] [--out results/explore_latency]

Defaults: ViT-S/8 with the golden random weights (speed does not depend on the values), stride 4, 224 px,
layer 9 key, log-binned (6528-d), the shared cat and ibex photos cycled (flipped copies beyond two) to make
up the image count. Prints a table and writes ``<out>.csv`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from densevit.models.provenance import weights_provenance
from densevit.apps.explore.session import Explorer, Settings
from densevit.apps.explore.web import _map
from PIL import Image, ImageOps

from densevit.io.paths import example_images, golden_weights
from densevit.io.files import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[2, 8], help="image counts to measure")
    p.add_argument("--backbone", default="dino_vits8")
    p.add_argument("--weights", default=None, help="default: the golden random ViT-S/8")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--load-size", type=int, default=224)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--facet", default="key")
    p.add_argument("--bin", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/explore_latency")
    return p


def images(n: int):
    base = [Image.open(p).convert("RGB") for p in example_images()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        out.append((f"{Path(example_images()[i % len(base)]).stem}{i}", ImageOps.mirror(im) if (i // 2) % 2 else im))
    return out


def measure(ex: Explorer, s: Settings, args, rng) -> dict:
    n = len(ex.images)
    t0 = time.perf_counter()
    ex.prepare(s)
    extract_s = time.perf_counter() - t0
    dev = torch.device(args.device)
    compute, response = [], []
    for c in range(args.warmup + args.clicks):
        src = int(rng.integers(n))
        H, W = ex.images[src].original_hw
        x, y = float(rng.uniform(0, W)), float(rng.uniform(0, H))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = ex.similarity(src, x, y, s, k=args.k)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        json.dumps({"maps": [_map(m) for m in r.maps]})
        t2 = time.perf_counter()
        if c >= args.warmup:
            compute.append(1000 * (t1 - t))
            response.append(1000 * (t2 - t))
    g = ex.grid(0, s)
    d = ex.descriptors(0, s).shape[1]
    return {"images": n, "tokens_per_image": g.num_tokens, "dims": d, "extraction_s": round(extract_s, 2),
            "compute_median_ms": round(float(np.median(compute)), 2),
            "compute_p95_ms": round(float(np.percentile(compute, 95)), 2),
            "response_median_ms": round(float(np.median(response)), 2),
            "response_p95_ms": round(float(np.percentile(response, 95)), 2), "clicks": args.clicks}


def main() -> None:
    args = build_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or str(golden_weights())
    ex = Explorer(args.backbone, weights=weights, device=args.device, stride=args.stride, load_size=args.load_size)
    s = ex.settings(layer=args.layer, facet=args.facet, bin=args.bin)
    rng = np.random.default_rng(0)
    rows = []
    for n in sorted(args.images):
        while len(ex.images) < n:
            name, im = images(n)[len(ex.images)]
            ex.add_image(im, name)
        rows.append(measure(ex, s, args, rng))
        r = rows[-1]
        print(f"{n} images ({r['tokens_per_image']} tokens x {r['dims']}-d each): click {r['compute_median_ms']:.1f} ms "
              f"median, {r['compute_p95_ms']:.1f} ms p95 (with response encoding {r['response_median_ms']:.1f} / "
              f"{r['response_p95_ms']:.1f} ms); first extraction {r['extraction_s']:.1f} s", flush=True)
    meta = {"backbone": args.backbone, "stride": args.stride, "load_size": args.load_size, "layer": args.layer,
            "facet": args.facet, "bin": args.bin, "k": args.k, "device": args.device,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "provenance": weights_provenance(weights, args.backbone)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    atomic_write_text(out.with_suffix(".json"), json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    print("\n| images | tokens x dims | click median | click p95 | + encoding median | + encoding p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['tokens_per_image']} x {r['dims']} | {r['compute_median_ms']:.1f} ms | "
              f"{r['compute_p95_ms']:.1f} ms | {r['response_median_ms']:.1f} ms | {r['response_p95_ms']:.1f} ms |")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
