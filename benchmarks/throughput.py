#!/usr/bin/env python
"""Dataset-extraction throughput: images per second into a feature store, over a folder of real photographs and
video frames, with 1 and N processes (torchrun), time split into decode / forward / writing / waiting.

    python benchmarks/throughput.py [--procs 1 2] [--frames 6] [--batch-size 4] [--shard-size 2] [--out results/throughput]
        [--reference DIR] [--images FILES_OR_FOLDERS...] [--repeat N] [--device cuda]

Inputs: the shared photographs (cat.jpg 4032x3024, ibex.jpg 2751x2686) and the first ``--frames`` frames of
the first two shared DAVIS sequences (854x480), linked into ``OUT/inputs``. Each configuration runs
``densevit-extract --store`` in fresh processes (``torchrun --nproc_per_node N`` for N > 1, each rank with
``cores / N`` threads) and reads the timing report it writes (``--stats``). Then the store is read back with
log-binning at read time (the time it takes is reported per image). On a GPU the busy fraction is given twice: the
GPU time of the forward passes (CUDA events) over the extraction loop's wall time, and the driver's utilisation
sampled through NVML over the same window (the share of time a kernel was running; "steady" leaves out the
first and last 10 % of the window); ``--repeat`` cycles the inputs for a run long enough to
measure it.

``--reference DIR`` also times the reference implementation (dino-vit-features' ``extractor.py`` beside DINO's
``vision_transformer.py`` and ``utils.py`` in DIR; not part of densevit) looping over the same images in one
process, with the same weights loaded into DINO's own model: ``preprocess`` + ``extract_descriptors(layer,
facet, bin=True)``. ``--decode-check`` compares ``--fast-decode`` with the exact decode instead.
Writes ``OUT/throughput.{md,csv,json}`` and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from densevit.models.provenance import weights_provenance
from densevit.errors import DensevitError
from densevit.io.paths import example_images, golden_weights, shared_dir
from densevit.io.files import atomic_write_text

PROG = "benchmarks/throughput.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=None,
                   help="image files/folders instead of the shared photographs + DAVIS frames")
    p.add_argument("--frames", type=int, default=6, help="frames taken from each of the first two DAVIS sequences")
    p.add_argument("--repeat", type=int, default=1,
                   help="cycle the inputs this many times (a run long enough to measure on a fast GPU)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to run")
    p.add_argument("--backbone", default="dino_vits8")
    p.add_argument("--weights", default=str(golden_weights()))
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--load-size", type=int, default=224)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--facet", default="key")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=2,
                   help="images per shard (shards are what ranks share: small here so 6 images split evenly)")
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes per rank")
    p.add_argument("--writers", type=int, default=2, help="shard-writing threads per rank")
    p.add_argument("--fast-decode", action="store_true")
    p.add_argument("--reference", default=None,
                   help="folder with dino-vit-features' extractor.py and DINO's vision_transformer.py and utils.py")
    p.add_argument("--decode-check", action="store_true",
                   help="only compare --fast-decode with the exact decode on the photographs: time and cosine")
    p.add_argument("--out", default="results/throughput")
    return p


def decode_check(args: argparse.Namespace, images: Sequence[Path]) -> List[Dict]:
    """Per photograph larger than 4x the load size: exact vs fast (draft-mode) decode + resize time (median of 5)
    and the cosine similarity of their descriptors (per token: mean and minimum; raw and log-binned)."""
    import statistics

    from PIL import Image

    from densevit.features.extractor import ViTExtractor
    from densevit.io.images import load_resized, normalize, to_uint8_tensor

    ext = ViTExtractor(args.backbone, stride=args.stride, weights=args.weights, device=args.device or "cpu")
    rows = []
    for p in images:
        with Image.open(p) as im:
            if min(im.size) < 4 * args.load_size:
                continue
            size = im.size
        times, desc = {}, {}
        for fast in (False, True):
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                img, hw = load_resized(p, args.load_size, fast)
                ts.append(time.perf_counter() - t)
            times[fast] = statistics.median(ts)
            x = normalize(to_uint8_tensor(img)[None], ext.spec.mean, ext.spec.std)
            f = ext.extract(x, (args.layer,), (args.facet,))
            raw = f.descriptors[(args.layer, args.facet)][0].float()
            from densevit.features.binning import log_bin

            h, w = f.grid.shape
            desc[fast] = (raw, log_bin(raw.T.reshape(1, -1, h, w))[0])
        cos = [torch.nn.functional.cosine_similarity(desc[False][i], desc[True][i], dim=-1) for i in (0, 1)]
        rows.append({"image": p.name, "size": f"{size[0]}x{size[1]}", "exact_ms": 1000 * times[False],
                     "fast_ms": 1000 * times[True], "speedup": times[False] / times[True],
                     "cos_mean": cos[0].mean().item(), "cos_min": cos[0].min().item(),
                     "cos_binned_mean": cos[1].mean().item(), "cos_binned_min": cos[1].min().item()})
        print(rows[-1], flush=True)
    return rows


def gather_inputs(args: argparse.Namespace, folder: Path) -> List[Path]:
    """Link the inputs into one folder (so one store run sees them all); returns the linked paths."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if args.images:
        from densevit.io.images import gather_images

        sources = gather_images(args.images)
    else:
        sources = [p for p in example_images() if p.is_file()]
        davis = shared_dir() / "data" / "davis2016" / "JPEGImages" / "480p"
        if davis.is_dir():
            for seq in sorted(d for d in davis.iterdir() if d.is_dir())[:2]:
                sources += [f for f in sorted(seq.glob("*.jpg"))[: args.frames]]
    out = []
    for i, src in enumerate(list(sources) * max(1, args.repeat)):
        dst = folder / f"{i:05d}_{src.parent.name}_{src.name}"
        dst.symlink_to(src.resolve())
        out.append(dst)
    if not out:
        raise DensevitError("no input images found")
    return out


class GpuBusy:
    """Samples every GPU's utilisation through NVML (``nvidia-ml-py``) in a thread: the percentage of time in
    the driver's last sample period during which a kernel was running. ``fraction(t0, t1)`` is the mean over
    the samples taken in a wall-clock window (Unix seconds), averaged over the GPUs that were used."""

    def __init__(self, period: float = 0.02):
        import pynvml  # nvidia-ml-py, installed with CUDA builds of torch

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.samples: List[tuple] = []          # (unix time, [util % per GPU])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            self.samples.append((time.time(), util))
            self._stop.wait(period)

    def __enter__(self) -> "GpuBusy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def fraction(self, t0: float, t1: float, gpus: int = 1) -> Optional[float]:
        inside = [u[:gpus] for t, u in self.samples if t0 <= t <= t1]
        if not inside:
            return None
        return float(np.mean(inside)) / 100.0


def run_store(args: argparse.Namespace, inputs: Path, store: Path, procs: int, stats: Path) -> Dict:
    """One extraction run in fresh processes; returns the --stats report plus the command's wall time."""
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)))
    flags = [str(inputs), "--store", str(store), "--overwrite", "--quiet", "--stats", str(stats),
             "--backbone", args.backbone, "--weights", args.weights, "--stride", str(args.stride),
             "--load-size", str(args.load_size), "--layer", str(args.layer), "--facet", args.facet,
             "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
             "--writers", str(args.writers),
             "--shard-size", str(args.shard_size)]
    if args.device:
        flags += ["--device", args.device]
    if args.fast_decode:
        flags.append("--fast-decode")
    if procs == 1:
        cmd = [sys.executable, "-m", "densevit.cli.extract", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "densevit.cli.extract", *flags]
    busy = GpuBusy() if _device(args) == "cuda" else contextlib.nullcontext()
    t = time.perf_counter()
    with busy:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise DensevitError(f"extraction with {procs} process(es) failed:\n{r.stderr[-2000:]}")
    report = json.loads(stats.read_text())
    report["command_wall"] = wall
    if isinstance(busy, GpuBusy):
        gpus = min(procs, len(busy.samples[0][1])) if busy.samples else 1
        w = report["window"]
        report["gpu_busy"] = busy.fraction(w[0], w[1], gpus)
        report["gpu_busy_steady"] = busy.fraction(w[0] + 0.1 * (w[1] - w[0]), w[1] - 0.1 * (w[1] - w[0]), gpus)
    return report


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def read_binned(store: Path, layer: int, facet: str, limit: int = 64) -> Dict[str, float]:
    """Seconds per image to read the store back log-binned (float32), over its first ``limit`` images."""
    from densevit.storage.store import FeatureStore

    st = FeatureStore(store)
    t = time.perf_counter()
    n = 0
    for b in st.batches(batch_size=4, layer=layer, facet=facet, bin=True):
        n += len(b.keys)
        if n >= limit:
            break
    return {"images": n, "seconds": time.perf_counter() - t}


def run_reference(args: argparse.Namespace, images: Sequence[Path]) -> Dict:
    """The reference implementation's loop over the same images in this process (its own preprocessing, full
    forward pass with hooks, Python-loop log-binning)."""
    ref = Path(args.reference)
    sys.path.insert(0, str(ref))
    try:
        vt = _load_module("vision_transformer", ref / "vision_transformer.py")
        rx = _load_module("ref_extractor", ref / "extractor.py")
    finally:
        sys.path.remove(str(ref))
    from densevit.models.weights import read_state_dict

    model = vt.vit_small(patch_size=8, num_classes=0)
    sd = {k: v.float() for k, v in read_state_dict(Path(args.weights)).items()}
    model.load_state_dict(sd, strict=True)
    device = _device(args)
    ext = rx.ViTExtractor("dino_vits8", stride=args.stride, model=model, device=device)
    seconds = {"preprocess": 0.0, "extract": 0.0}
    busy = GpuBusy() if device == "cuda" else contextlib.nullcontext()
    t_all, unix0 = time.perf_counter(), time.time()
    with torch.no_grad(), busy:
        for p in images:
            t = time.perf_counter()
            batch, _ = ext.preprocess(str(p), args.load_size)
            seconds["preprocess"] += time.perf_counter() - t
            t = time.perf_counter()
            d = ext.extract_descriptors(batch.to(device), args.layer, args.facet, bin=True)
            d.cpu()
            seconds["extract"] += time.perf_counter() - t
    wall = time.perf_counter() - t_all
    return {"images": len(images), "seconds": seconds, "wall": wall, "descriptor_shape": list(d.shape),
            "gpu_busy": busy.fraction(unix0, time.time()) if isinstance(busy, GpuBusy) else None}


def _load_module(name: str, path: Path):
    if not path.is_file():
        raise DensevitError(f"--reference: {path} not found")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    images = gather_inputs(args, out / "inputs")
    names = [p.name for p in images]
    print(f"{len(images)} images: {', '.join(names[:6])}" + (f", ... {names[-1]}" if len(names) > 6 else ""),
          flush=True)
    if args.decode_check:
        rows = decode_check(args, images)
        md = ("| image | size | exact decode+resize | fast | speed-up | cosine mean / min | binned mean / min |\n"
              "|---|---|---|---|---|---|---|\n" + "".join(
                  f"| {r['image']} | {r['size']} | {r['exact_ms']:.0f} ms | {r['fast_ms']:.0f} ms | "
                  f"{r['speedup']:.1f}x | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | "
                  f"{r['cos_binned_mean']:.4f} / {r['cos_binned_min']:.4f} |\n" for r in rows))
        atomic_write_text((out / "decode_check.md"), md)
        print(md)
        return 0
    rows = []
    for n in args.procs:
        rep = run_store(args, out / "inputs", out / f"store_p{n}", n, out / f"stats_p{n}.json")
        s, wall = rep["seconds"], rep["seconds"]["total"]
        busy = [r["seconds"]["forward"] / r["seconds"]["total"] for r in rep["per_rank"] if r["seconds"]["total"]]
        gpu = [r["seconds"]["gpu"] / r["seconds"]["total"] for r in rep["per_rank"]
               if r["seconds"]["total"] and "gpu" in r["seconds"]]
        binned = read_binned(out / f"store_p{n}", args.layer, args.facet)
        rows.append({"run": f"densevit store, {n} process(es)", "images": rep["images"], "wall_s": wall,
                     "img_per_s": rep["images"] / wall, "decode_s": s["decode"], "forward_s": s["forward"],
                     "write_s": s["write"], "wait_s": s["wait"], "model_busy": sum(busy) / len(busy),
                     "bin_at_read_ms_per_img": 1000 * binned["seconds"] / max(1, binned["images"]),
                     "startup_s": rep["command_wall"] - wall, "gpu_busy": rep.get("gpu_busy"),
                     "gpu_busy_events": sum(gpu) / len(gpu) if gpu else None,
                     "gpu_busy_steady": rep.get("gpu_busy_steady")})
        print(_row_text(rows[-1]), flush=True)
    if args.reference:
        ref = run_reference(args, images)
        rows.append({"run": "reference (dino-vit-features), 1 process", "images": ref["images"], "wall_s": ref["wall"],
                     "img_per_s": ref["images"] / ref["wall"], "decode_s": ref["seconds"]["preprocess"],
                     "forward_s": ref["seconds"]["extract"], "write_s": 0.0, "wait_s": 0.0,
                     "model_busy": ref["seconds"]["extract"] / ref["wall"], "bin_at_read_ms_per_img": None,
                     "startup_s": None, "gpu_busy": ref.get("gpu_busy"), "gpu_busy_steady": None,
                     "gpu_busy_events": None})
        print(_row_text(rows[-1]), flush=True)
    meta = {"device": _device(args), "gpu": torch.cuda.get_device_name() if _device(args) == "cuda" else None,
            "cores": os.cpu_count(),
            "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "images"},
            "images": [str(p.resolve()) for p in images],
            "provenance": weights_provenance(args.weights, args.backbone)}
    atomic_write_text((out / "throughput.json"), json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = _markdown(rows)
    atomic_write_text((out / "throughput.md"), md)
    print(md)
    return 0


def _row_text(r: Dict) -> str:
    gpu = f", GPU busy {100 * r['gpu_busy']:.0f}% (NVML)" if r.get("gpu_busy") is not None else ""
    if r.get("gpu_busy_events") is not None:
        gpu += f", {100 * r['gpu_busy_events']:.0f}% (CUDA events)"
    return (f"{r['run']}: {r['images']} images in {r['wall_s']:.1f} s = {r['img_per_s']:.3f} img/s "
            f"(decode {r['decode_s']:.1f} s, forward {r['forward_s']:.1f} s, write {r['write_s']:.1f} s, "
            f"wait {r['wait_s']:.1f} s{gpu})")


def _markdown(rows: List[Dict]) -> str:
    gpu = any(r.get("gpu_busy") is not None for r in rows)
    head = ("| run | images | wall s | img/s | decode s | forward s | write s | waiting s | model busy | "
            + ("GPU busy: CUDA events / NVML (steady) | " if gpu else "") + "bin at read |\n|"
            + "---|" * (11 if gpu else 10) + "\n")
    body = ""
    for r in rows:
        bin_ms = f"{r['bin_at_read_ms_per_img']:.0f} ms/img" if r["bin_at_read_ms_per_img"] is not None else "(in forward)"
        if gpu:
            ev = "-" if r.get("gpu_busy_events") is None else f"{100 * r['gpu_busy_events']:.0f}%"
            busy = ev + " / " + ("-" if r.get("gpu_busy") is None else f"{100 * r['gpu_busy']:.0f}%")
            if r.get("gpu_busy_steady") is not None:
                busy += f" ({100 * r['gpu_busy_steady']:.0f}%)"
            bin_ms = f"{busy} | {bin_ms}"
        body += (f"| {r['run']} | {r['images']} | {r['wall_s']:.1f} | {r['img_per_s']:.3f} | {r['decode_s']:.1f} | "
                 f"{r['forward_s']:.1f} | {r['write_s']:.1f} | {r['wait_s']:.1f} | {100 * r['model_busy']:.0f}% | "
                 f"{bin_ms} |\n")
    return head + body


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DensevitError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
