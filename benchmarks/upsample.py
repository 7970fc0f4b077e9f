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
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


# ---------------------------------------------------------------- high resolution: memory and time growth
HIGHRES_SIZES = (448, 896, 1344)
MODEL_MEMORIES_GB = (24, 80)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child_extract(args: argparse.Namespace) -> dict:
    """One subprocess: features at the patch stride (saved for the upsamplers) or the stride trick (timed)."""
    ext = ViTExtractor(args.backbones[0], weights=str(shared_dir() / "golden" / BACKBONES[args.backbones[0]]),
                       device="cpu")
    x, _ = ext.preprocess(args.image, args.size)
    stride = args.stride or ext.patch_size
    ext.extract(x[..., :32, :32], (LAYER,), (FACET,), stride=stride)            # warm-up (threads, kernels)
    if args.random_features:     # the upsamplers' cost depends on the shapes only: skip the extraction
        grid = ext.grid(tuple(x.shape[-2:]), stride=stride)
        tokens = torch.randn(1, grid.num_tokens, ext.spec.embed_dim if hasattr(ext.spec, "embed_dim") else 384,
                             generator=torch.Generator().manual_seed(0))
        row = dict(note="random features of the extractor's shape (extraction not run)")
    else:
        reset_peak(torch.device("cpu"))
        base = _status_kib("VmRSS")
        t0 = time.perf_counter()
        feats = ext.extract(x, (LAYER,), (FACET,), stride=stride)
        seconds = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        grid, tokens = feats.grid, feats.descriptors[(LAYER, FACET)].float()
        row = dict(seconds=seconds, extra_gib=(peak - base) / 2 ** 20, process_gib=_status_kib("VmHWM") / 2 ** 20)
    if args.save:
        torch.save(dict(tokens=tokens, patch=grid.patch_size, stride=grid.stride, input_hw=tuple(grid.input_hw),
                        guide=denormalize(x, ext.spec.mean, ext.spec.std).float()), args.save)
    return dict(row, input="x".join(map(str, x.shape[-2:])), tokens=grid.num_tokens, patch=ext.patch_size)


def child_upsample(args: argparse.Namespace) -> dict:
    """One subprocess: ``upsample_tokens`` of the saved patch-stride map onto every input pixel."""
    from densevit.models.grid import TokenGrid
    from densevit.upsample import upsample_tokens
    from densevit.upsample.upsample_anything import fit_kernels

    d = torch.load(args.load, weights_only=False)
    grid = TokenGrid(d["patch"], d["stride"], d["input_hw"])
    opts = {"weights": args.anyup_weights} if args.method == "anyup" else {}
    if args.method == "upsample_anything":
        opts["steps"] = args.ua_steps
    if args.max_bytes:
        opts["max_bytes"] = args.max_bytes
    small = TokenGrid(d["patch"], d["stride"], (32, 32))
    upsample_tokens(d["tokens"][:, :small.num_tokens], small, d["guide"][..., :32, :32], args.method,
                    **dict(opts, steps=1) if args.method == "upsample_anything" else opts)      # warm-up
    reset_peak(torch.device("cpu"))
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    up, out_grid = upsample_tokens(d["tokens"], grid, d["guide"], args.method, **opts)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    row = dict(seconds=seconds, extra_gib=(peak - base) / 2 ** 20, process_gib=peak / 2 ** 20,
               output_gib=up.numel() * up.element_size() / 2 ** 30, input="x".join(map(str, d["input_hw"])),
               mpx=out_grid.num_tokens / 1e6, finite=bool(torch.isfinite(up).all()))
    if args.method == "upsample_anything" and args.ua_steps < 51:
        del up
        H, W = d["guide"].shape[-2:]
        h, w = grid.shape
        t0 = time.perf_counter()
        s = max(1, round(H / h))
        g = F.interpolate(d["guide"], size=(s * h, s * w), mode="bilinear", align_corners=False).clamp(0, 1)[0]
        fit_kernels(g, (h, w), s, steps=1)
        step = time.perf_counter() - t0
        row.update(measured_seconds=seconds, steps=args.ua_steps, seconds=seconds + (51 - args.ua_steps) * step,
                   note=f"{args.ua_steps} fit steps run; time extrapolated to 51 with one step's "
                        f"{step:.0f} s (memory does not depend on the steps)")
    return row


def _run_child(argv: List[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return dict(error=tail[-300:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def power_law(px: List[float], ys: List[float]) -> Optional[Tuple[float, float]]:
    """Least-squares ``y = a * px ** b`` over the points (``(a, b)``; ``None`` with fewer than two)."""
    pts = [(p, y) for p, y in zip(px, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    b, log_a = np.polyfit(np.log([p for p, _ in pts]), np.log([y for _, y in pts]), 1)
    return float(np.exp(log_a)), float(b)


def highres(args: argparse.Namespace) -> int:
    """The high-resolution table: every upsampler (and the stride trick) at each size, one subprocess each."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows: List[dict] = []
    if args.append and (args.out / "results.json").exists():
        rows = json.loads((args.out / "results.json").read_text())["rows"]
    common = ["--backbones", args.backbones[0], "--image", str(args.image)]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            feats = Path(tmp) / f"f{size}.pt"
            r = _run_child(["--child", "extract", "--size", str(size), "--save", str(feats), *common] +
                           (["--random-features"] if args.random_features else []))
            rows.append(dict(size=size, method="patch stride (extraction)", **r))
            print(rows[-1], flush=True)
            if "error" in r:
                continue
            s = args.trick_stride
            n = r["tokens"] * (r["patch"] // s) ** 2
            if args.skip_trick:
                t = None
            elif n <= args.max_tokens:
                t = _run_child(["--child", "extract", "--size", str(size), "--stride", str(s), *common])
            else:
                t = dict(note=f"not run: {n} tokens over --max-tokens {args.max_tokens} (time grows with their "
                              f"square)")
            if t is not None:
                rows.append(dict(size=size, method=f"stride trick {s} (extraction)", **t))
                print(rows[-1], flush=True)
            for m in args.methods:
                argv = ["--child", "upsample", "--load", str(feats), "--method", m, "--ua-steps", str(args.ua_steps),
                        "--anyup-weights", args.anyup_weights, *common]
                if args.max_bytes:
                    argv += ["--max-bytes", args.max_bytes]
                rows.append(dict(size=size, method=m, **_run_child(argv)))
                print(rows[-1], flush=True)
                write_highres(args, rows)          # after every point: a long run that is stopped keeps its rows
    return write_highres(args, rows, show=True)


def write_highres(args: argparse.Namespace, rows: List[dict], show: bool = False) -> int:
    """Fit the growth and write ``results.json``, ``table.csv`` and ``table.md`` under ``args.out``."""
    fits = {}
    for m in args.methods:
        pts = [r for r in rows if r["method"] == m and "error" not in r and r.get("mpx")]
        px = [r["mpx"] for r in pts]
        fits[m] = dict(memory=power_law(px, [r["extra_gib"] for r in pts]),
                       time=power_law(px, [r["seconds"] for r in pts]),
                       base_gib=min([r["process_gib"] - r["extra_gib"] for r in pts], default=None))
        if len({r["mpx"] for r in pts}) >= 2 and fits[m]["base_gib"] is not None:
            # Capacity model: extra = c0 + c1 * Mpx (every method's memory is linear in the pixels by design;
            # the power-law exponent above is the check), plus the process's base, against G decimal GB.
            c1, c0 = np.polyfit(px, [r["extra_gib"] for r in pts], 1)
            fits[m]["linear_gib"] = dict(per_mpx=float(c1), intercept=float(c0))
            fits[m]["max_mpx"] = {f"{g} GB": float((g * 1e9 / 2 ** 30 - fits[m]["base_gib"] - c0) / c1)
                                  for g in MODEL_MEMORIES_GB}
    meta = dict(device="cpu", torch=torch.__version__, machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), backbone=args.backbones[0], layer=LAYER, facet=FACET,
                image=str(args.image), max_bytes=args.max_bytes, anyup_weights=args.anyup_weights,
                measure="per subprocess: VmHWM reset before the call (extra = peak - RSS before the call; process "
                        "= the process's peak), time of the one call")
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, fits=fits), indent=1))
    keys = ["size", "method", "input", "mpx", "seconds", "extra_gib", "process_gib", "output_gib", "note", "error"]
    with open(args.out / "table.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    (args.out / "table.md").write_text(highres_markdown(rows, fits))
    if show:
        print(highres_markdown(rows, fits))
    return 0


def highres_markdown(rows: List[dict], fits: Dict[str, dict]) -> str:
    def num(v, f):
        return "-" if v is None else format(v, f)
    lines = ["| load size | method | input | output Mpx | time s | extra peak GiB | process peak GiB | note |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['method']} | {r.get('input', '-')} | {num(r.get('mpx'), '.2f')} "
                     f"| {num(r.get('seconds'), '.1f')} | {num(r.get('extra_gib'), '.2f')} "
                     f"| {num(r.get('process_gib'), '.2f')} | {r.get('note') or r.get('error') or ''} |")
    lines += ["", "| method | memory ~ Mpx^b: b | time ~ Mpx^b: b | memory model GiB | " +
              " | ".join(f"max Mpx in {g} GB (model)" for g in MODEL_MEMORIES_GB) + " |",
              "|---|---:|---:|---|" + "---:|" * len(MODEL_MEMORIES_GB)]
    for m, f in fits.items():
        mem, tim, lin = f["memory"], f["time"], f.get("linear_gib")
        cap = f.get("max_mpx") or {}
        model = "-" if not lin else f"{f['base_gib']:.2f} + {lin['intercept']:.2f} + {lin['per_mpx']:.2f} x Mpx"
        lines.append(f"| {m} | {num(mem and mem[1], '.2f')} | {num(tim and tim[1], '.2f')} | {model} | " +
                     " | ".join(num(cap.get(f'{g} GB'), '.1f') for g in MODEL_MEMORIES_GB) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder for table.md, results.json, pca.png (table.csv with --highres)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--sizes", nargs="+", type=int, default=None, help="load sizes (default: 224 448; with "
                    "--highres 448 896 1344)")
    ap.add_argument("--methods", nargs="+", default=list(UPSAMPLERS), choices=list(UPSAMPLERS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median) after one warm-up")
    ap.add_argument("--ua-max", type=int, default=10 ** 6,
                    help="run upsample_anything only up to this load size (its fit is slow on CPU)")
    ap.add_argument("--max-tokens", type=int, default=10 ** 9,
                    help="skip the stride trick above this many tokens (its attention grows with the square)")
    ap.add_argument("--anyup-weights", default="random", help="AnyUp checkpoint (default: random weights)")
    ap.add_argument("--image", type=Path, default=shared_dir() / "data" / "images" / "ibex.jpg")
    ap.add_argument("--highres", action="store_true", help="the high-resolution table: each upsampler onto every "
                    "input pixel, one subprocess per point (peak memory and time), growth fitted")
    ap.add_argument("--ua-steps", type=int, default=51, help="--highres: Upsample Anything's fit steps (fewer: "
                    "the time is extrapolated to 51 from one step)")
    ap.add_argument("--trick-stride", type=int, default=4, help="--highres: the stride trick's stride")
    ap.add_argument("--max-bytes", default=None, help="--highres: the memory bound of each upsampling call")
    ap.add_argument("--append", action="store_true", help="--highres: add the rows to those of --out's "
                    "results.json (points run one at a time, across several calls)")
    ap.add_argument("--random-features", action="store_true", help="--highres: upsample random features of the "
                    "extractor's shape instead of extracting them (the same cost; saves the extraction's time)")
    ap.add_argument("--refit", action="store_true", help="--highres: only refit and rewrite the tables of --out's "
                    "results.json")
    ap.add_argument("--skip-trick", action="store_true", help="--highres: do not run the stride trick")
    ap.add_argument("--child", choices=["extract", "upsample"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stride", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child_extract(args) if args.child == "extract" else child_upsample(args)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.refit:
        return write_highres(args, json.loads((args.out / "results.json").read_text())["rows"], show=True)
    if args.highres:
        args.sizes = args.sizes or list(HIGHRES_SIZES)
        args.max_tokens = min(args.max_tokens, 20000)
        return highres(args)
    args.sizes = args.sizes or [224, 448]
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
