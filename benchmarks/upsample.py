"""Pixel-dense features two ways: the stride trick versus patch-stride extraction + a feature upsampler.

For each backbone (golden random weights) and load size, and each finer stride ``s`` (patch/2, patch/4), it
measures (a) extraction at stride ``s`` and (b) extraction at the patch stride followed by each upsampler
(:data:`densevit.upsample.UPSAMPLERS`) to the same density (an output of ``H/s x W/s`` pixels): time (median of
``--repeats`` runs after one warm-up; one run for ``upsample_anything``, which fits per image), the extra peak
memory over the memory held before the call (GPU: ``max_memory_allocated``; CPU: peak RSS, reset first) and the
mean per-token cosine between the upsampled map, read at the stride-trick tokens' centres (nearest output pixel,
through ``TokenGrid.pixels``), and the stride-trick descriptors. With random weights (and AnyUp with random
weights unless ``--anyup-weights``) this checks the pipeline; it says nothing about quality.

    python benchmarks/upsample.py --out benchmarks/results/upsample --device cpu
    python benchmarks/upsample.py --out benchmarks/results/upsample --device cpu --repeats 1 --ua-max 224 \
        --max-tokens 13000   # what a 2-core CPU can do in minutes
Results: ``table.md``, ``results.json`` and ``pca.png`` (image | patch stride | stride patch/4 | each upsampler,
one PCA basis fitted on the patch-stride map) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from densevit import ViTExtractor
from densevit.io.images import denormalize
from densevit.io.paths import shared_dir
from densevit.runtime.device import select_device, synchronize
from densevit.upsample import UPSAMPLERS
from speed import peak_gib, reset_peak  # the sibling benchmark's memory helpers
from densevit.io.files import atomic_write_text

BACKBONES = {"dino_vits8": "vits8_random_fp16.pth", "dinov3_vits16": "dinov3_vits16_random_official_fp16.pth"}
LAYER, FACET = 11, "key"


def _rss_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return 0.0


def measure(fn, device: torch.device, repeats: int):
    """``(output, median seconds, extra peak GiB)`` of ``fn()`` (one warm-up run when ``repeats > 1``)."""
    if repeats > 1:
        fn()
    times, out, extra = [], None, 0.0
    for _ in range(max(1, repeats)):
        out = None
        synchronize(device)
        reset_peak(device)
        base = _rss_gib(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        extra = max(extra, peak_gib(device) - base)
    return out, float(np.median(times)), extra


def mean_cosine(up, ref) -> float:
    """Mean cosine of ``up``'s descriptors at the pixels nearest ``ref``'s token centres and ``ref``'s."""
    idx = up.grid.pixels_to_tokens(ref.grid.token_centers())  # both grids' "image" is the input (no image_hw)
    a = up.descriptors[(LAYER, FACET)][0, idx]
    b = ref.descriptors[(LAYER, FACET)][0]
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


def run_config(backbone: str, size: int, device: torch.device, repeats: int, methods: List[str],
               ua_max: int, anyup_weights: str, image: Path, max_tokens: int) -> tuple:
    ext = ViTExtractor(backbone, weights=str(shared_dir() / "golden" / BACKBONES[backbone]), device=device)
    x, _ = ext.preprocess(image, size)
    H, W = x.shape[-2:]
    p = ext.patch_size
    rows, maps = [], {}
    base, t_base, m_base = measure(lambda: ext.extract(x, (LAYER,), (FACET,)), device, repeats)
    rows.append(dict(backbone=backbone, size=size, input=f"{H}x{W}", method=f"patch stride {p}",
                     output="x".join(map(str, base.grid.shape)), seconds=t_base, peak_gib=m_base, cosine=None))
    maps["patch stride"] = base
    for s in (p // 2, p // 4):
        shape = ext.grid((H, W), stride=s).shape
        if shape[0] * shape[1] > max_tokens:
            ref = None
            rows.append(dict(backbone=backbone, size=size, input=f"{H}x{W}", method=f"stride trick {s}",
                             output="x".join(map(str, shape)), seconds=None, peak_gib=None, cosine=None,
                             note=f"not run: over {max_tokens} tokens (--max-tokens)"))
        else:
            ref, t, m = measure(lambda: ext.extract(x, (LAYER,), (FACET,), stride=s), device, repeats)
            rows.append(dict(backbone=backbone, size=size, input=f"{H}x{W}", method=f"stride trick {s}",
                             output="x".join(map(str, ref.grid.shape)), seconds=t, peak_gib=m, cosine=1.0))
        out_size = (round(H / s), round(W / s))
        for name in methods:
            if name == "upsample_anything" and size > ua_max:
                rows.append(dict(backbone=backbone, size=size, input=f"{H}x{W}", method=f"{name} to /{s}",
                                 output="x".join(map(str, out_size)), seconds=None, peak_gib=None, cosine=None,
                                 note=f"not run above {ua_max} px on this device (--ua-max)"))
                continue
            opts = {"weights": anyup_weights} if name == "anyup" else {}
            torch.manual_seed(0)
            up, t, m = measure(lambda: ext.extract(x, (LAYER,), (FACET,), upsample=name, out_size=out_size,
                                                   upsample_options=opts),
                               device, 1 if name == "upsample_anything" else repeats)
            rows.append(dict(backbone=backbone, size=size, input=f"{H}x{W}", method=f"{name} to /{s}",
                             output="x".join(map(str, out_size)), seconds=t, peak_gib=m,
                             cosine=None if ref is None else mean_cosine(up, ref)))
            if s == p // 4:
                maps[name] = up
        if s == p // 4 and ref is not None:
            maps[f"stride {s}"] = ref
    return rows, maps, x, ext


def pca_picture(maps: Dict[str, object], x: torch.Tensor, ext: ViTExtractor, order: List[str], tile: int = 200
                ) -> Image.Image:
    """Image | one tile per map, coloured by the top 3 principal components of the patch-stride map."""
    base = maps["patch stride"].descriptors[(LAYER, FACET)][0].float()
    mu = base.mean(0)
    _, _, V = torch.pca_lowrank(base - mu, q=3, center=False)
    proj = (base - mu) @ V
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    img = (denormalize(x[0], ext.spec.mean, ext.spec.std) * 255).byte().permute(1, 2, 0).cpu().numpy()
    H, W = img.shape[:2]
    th, tw = tile, round(tile * W / H)
    tiles = [("image", Image.fromarray(img).resize((tw, th), Image.BILINEAR))]
    for name in order:
        f = maps[name]
        h, w = f.grid.shape
        rgb = (((f.descriptors[(LAYER, FACET)][0].float() - mu) @ V - lo) / (hi - lo)).clamp(0, 1)
        arr = (rgb.view(h, w, 3) * 255).byte().cpu().numpy()
        tiles.append((name, Image.fromarray(arr).resize((tw, th), Image.NEAREST)))
    canvas = Image.new("RGB", (len(tiles) * (tw + 4), th + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, t) in enumerate(tiles):
        canvas.paste(t, (i * (tw + 4), 18))
        draw.text((i * (tw + 4) + 2, 3), name, fill="black")
    return canvas


def format_table(rows: List[dict]) -> str:
    lines = ["| backbone | load size (input) | method | output grid | time s | extra peak GiB "
             "| mean cos to stride trick |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        t = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
        m = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        c = r.get("note") or ("-" if r["cosine"] is None else f"{r['cosine']:.3f}")
        lines.append(f"| {r['backbone']} | {r['size']} ({r['input']}) | {r['method']} | {r['output']} "
                     f"| {t} | {m} | {c} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for table.md, results.json, pca.png")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    ap.add_argument("--methods", nargs="+", default=list(UPSAMPLERS), choices=list(UPSAMPLERS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median) after one warm-up")
    ap.add_argument("--ua-max", type=int, default=10 ** 6,
                    help="run upsample_anything only up to this load size (its fit is slow on CPU)")
    ap.add_argument("--max-tokens", type=int, default=10 ** 9,
                    help="skip the stride trick above this many tokens (its attention grows with the square)")
    ap.add_argument("--anyup-weights", default="random", help="AnyUp checkpoint (default: random weights)")
    ap.add_argument("--image", type=Path, default=shared_dir() / "data" / "images" / "ibex.jpg")
    args = ap.parse_args(argv)
    device = select_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: List[dict] = []
    picture = None
    for backbone in args.backbones:
        for size in args.sizes:
            r, maps, x, ext = run_config(backbone, size, device, args.repeats, args.methods, args.ua_max,
                                         args.anyup_weights, args.image, args.max_tokens)
            rows += r
            print(format_table(r), flush=True)
            if picture is None:
                s = ext.patch_size // 4
                picture = pca_picture(maps, x, ext, [k for k in ["patch stride", f"stride {s}"] if k in maps] +
                                      [m for m in args.methods if m in maps])
                picture.quantize(256).save(args.out / "pca.png", optimize=True)  # small enough to commit
    meta = dict(device=str(device), torch=torch.__version__, machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), layer=LAYER, facet=FACET, image=str(args.image),
                weights="golden random (pipeline check, not a quality claim)", anyup_weights=args.anyup_weights)
    atomic_write_text((args.out / "results.json"), json.dumps(dict(meta=meta, rows=rows), indent=1))
    atomic_write_text((args.out / "table.md"), format_table(rows) + "\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
