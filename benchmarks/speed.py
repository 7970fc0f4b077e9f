"""Speed and memory benchmark: extraction, DAVIS propagation and best-buddy matching.

For each configuration it reports throughput (images/s, frames/s or pairs/s; median of repeated runs after a
warm-up, CUDA synchronised), peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak
RSS, reset before each configuration) and, for extraction and propagation, the FLOP count of the forward pass per
image or frame (``GFLOP``) and the achieved TFLOP/s. Beside it runs the bare forward pass (extraction: through
the same blocks; propagation: the features of the already-decoded frames in the same batches), so the overhead
of everything else is visible; propagation also records the decoding time per frame on one thread.

    python benchmarks/speed.py                       # default configurations, on CUDA when available
    python benchmarks/speed.py --device cpu --quick  # fewer repeats
Results: a printed table and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from densevit import ViTExtractor
from densevit.io.paths import golden_weights, shared_dir
from densevit.runtime.device import select_device, synchronize
from densevit.runtime.threads import BackgroundWriter


@dataclass
class Config:
    kind: str                   # "extract" | "vos" | "match"
    backbone: str = "dino_vits8"
    stride: int = 4
    load_size: int = 224
    layer: int = 11
    facet: str = "key"
    bin: bool = False
    saliency: bool = False
    dtype: str = "float32"
    batch: int = 1
    frames: int = 16            # vos: frames propagated

    @property
    def name(self) -> str:
        if self.kind == "vos":
            return f"vos {self.backbone} s{self.stride} 480p {self.dtype} b{self.batch} {self.frames}fr"
        if self.kind == "match":
            return f"match {self.backbone} s{self.stride} {self.load_size}px l{self.layer} bin {self.dtype}"
        extra = ("+bin" if self.bin else "") + ("+sal" if self.saliency else "")
        return (f"extract {self.backbone} s{self.stride} {self.load_size}px l{self.layer} {self.facet}{extra} "
                f"{self.dtype} b{self.batch}")


@dataclass
class Result:
    config: Config
    unit: str
    throughput: float
    median_s: float
    peak_mem_gib: float
    forward_throughput: Optional[float] = None
    overhead_pct: Optional[float] = None
    gflop: Optional[float] = None
    tflops: Optional[float] = None
    extra: dict = field(default_factory=dict)


def default_configs() -> List[Config]:
    return [
        Config("extract", load_size=224, layer=11),
        Config("extract", load_size=224, layer=9, bin=True),
        Config("extract", load_size=224, layer=11, saliency=True),
        Config("extract", load_size=448, layer=11),
        Config("extract", load_size=448, layer=9, bin=True),
        Config("extract", backbone="dinov3_vits16", stride=16, load_size=448, layer=11),
        Config("extract", backbone="dinov3_vits16", stride=8, load_size=448, layer=11),
        Config("vos", backbone="dino_vits16", stride=16),
        Config("vos", stride=8),
        Config("match", load_size=224, layer=9, bin=True),
    ]


def gpu_configs() -> List[Config]:
    """The issue's GPU targets: batched bf16/fp32 extraction, 448 px single image, bf16 propagation."""
    out = []
    for dtype in ("bfloat16", "float32"):
        out += [Config("extract", layer=9, bin=True, dtype=dtype, batch=b) for b in (1, 16, 64)]
        out.append(Config("vos", stride=8, dtype=dtype, batch=8, frames=64))
    out += [Config("extract", load_size=448, layer=11, dtype="float32"), Config("extract", load_size=448, layer=9,
                                                                                 bin=True, dtype="bfloat16")]
    out += [Config("extract", backbone=b, stride=s, load_size=448, layer=11, dtype="bfloat16")
            for b in ("dinov3_vits16", "dinov3_vitb16") for s in (16, 8)]
    out.append(Config("match", layer=9, bin=True))
    return out


# ---------------------------------------------------------------------------- measurement helpers
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_flops(ext: ViTExtractor, input_hw, blocks: int, batch: int) -> float:
    """Multiply-adds x 2 of the patch embedding and ``blocks`` transformer blocks for this token count: every
    linear layer of a block (q/k/v, projection, MLP of any kind) once per token, plus the two ``T x T``
    attention products."""
    h, w = ext.grid(input_hw).shape
    T = h * w + ext.num_prefix_tokens
    C = ext.model.embed_dim
    linear = sum(m.weight.numel() for m in ext.model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    embed = 2 * h * w * 3 * ext.patch_size ** 2 * C
    per_block = 2 * T * linear + 2 * 2 * T * T * C
    return batch * (embed + blocks * per_block)


def _extractor(cfg: Config, weights: str, device: torch.device) -> ViTExtractor:
    if cfg.backbone != "dino_vits8" and weights == str(golden_weights()):
        weights = "random"  # the golden file holds ViT-S/8 weights; speed does not depend on the values
    return ViTExtractor(cfg.backbone, stride=cfg.stride, weights=weights, device=device, dtype=cfg.dtype)


def _image_batch(ext: ViTExtractor, cfg: Config) -> torch.Tensor:
    x, _ = ext.preprocess(shared_dir() / "data" / "images" / "cat.jpg", cfg.load_size)
    return x.expand(cfg.batch, -1, -1, -1).contiguous()


# ---------------------------------------------------------------------------- the three kinds
def bench_extract(cfg: Config, weights: str, device: torch.device, warmup: int, repeats: int) -> Result:
    ext = _extractor(cfg, weights, device)
    x = _image_batch(ext, cfg)
    deepest = ext.spec.saliency_layer if cfg.saliency else ext.resolve_layer(cfg.layer)
    fwd = median_time(lambda: ext.forward_until(x, deepest), device, warmup, repeats)
    reset_peak(device)
    t = median_time(lambda: ext.extract(x, (cfg.layer,), (cfg.facet,), bin=cfg.bin, saliency=cfg.saliency),
                    device, warmup, repeats)
    flops = forward_flops(ext, tuple(x.shape[-2:]), deepest + 1, cfg.batch)
    return Result(cfg, "img/s", cfg.batch / t, t, peak_gib(device), forward_throughput=cfg.batch / fwd,
                  overhead_pct=100 * (t / fwd - 1), gflop=flops / cfg.batch / 1e9, tflops=flops / t / 1e12,
                  extra={"tokens": ext.grid(tuple(x.shape[-2:])).num_tokens})


def bench_vos(cfg: Config, weights: str, device: torch.device, warmup: int, repeats: int) -> Result:
    from densevit.apps.vos import VOSConfig, input_size, load_frame, propagate

    from densevit.eval.datasets.davis import read_mask, write_mask

    seq = shared_dir() / "data" / "davis2016"
    frames = sorted((seq / "JPEGImages" / "480p" / "blackswan").glob("*.jpg"))[: cfg.frames]
    first = (read_mask(seq / "Annotations" / "480p" / "blackswan" / "00000.png") > 0).astype(np.uint8)
    ext = _extractor(cfg, weights, device)
    vcfg = VOSConfig(batch_size=cfg.batch)
    n = len(frames)

    def run() -> None:  # decode -> features -> propagation -> written PNG masks
        with tempfile.TemporaryDirectory() as tmp, BackgroundWriter() as writer:
            for i, m in enumerate(propagate(ext, frames, first, vcfg)):
                writer.submit(write_mask, Path(tmp) / f"{i:05d}.png", m)

    reset_peak(device)
    t = median_time(run, device, min(warmup, 1), max(1, repeats // 3))
    peak = peak_gib(device)
    # where the time goes: decoding alone (one thread) and the features alone (decoded frames, same batches)
    input_hw = input_size(first.shape, vcfg.short_side, vcfg.multiple)
    t0 = time.perf_counter()
    xs = [load_frame(f, input_hw, ext.spec.mean, ext.spec.std)[0] for f in frames]
    decode = (time.perf_counter() - t0) / n
    batches = [torch.stack(xs[s:s + vcfg.batch_size]) for s in range(0, n, vcfg.batch_size)]
    layer = ext.resolve_layer(vcfg.layer)
    fwd = median_time(lambda: [ext.extract(x, (layer,), (vcfg.facet,)) for x in batches], device,
                      min(warmup, 1), max(1, repeats // 3))
    flops = forward_flops(ext, input_hw, layer + 1, n)
    return Result(cfg, "frame/s", n / t, t, peak, forward_throughput=n / fwd, overhead_pct=100 * (t / fwd - 1),
                  gflop=flops / n / 1e9, tflops=flops / t / 1e12,
                  extra={"frames": n, "tokens": ext.grid(input_hw).num_tokens, "decode_ms_per_frame": 1e3 * decode,
                         "features_ms_per_frame": 1e3 * fwd / n, "end_to_end_ms_per_frame": 1e3 * t / n})


def bench_match(cfg: Config, weights: str, device: torch.device, warmup: int, repeats: int) -> Result:
    from densevit.matching.knn import best_buddies

    ext = _extractor(cfg, weights, device)
    descs = []
    for name in ("cat.jpg", "ibex.jpg"):
        x, _ = ext.preprocess(shared_dir() / "data" / "images" / name, cfg.load_size)
        descs.append(ext.extract_descriptors(x, cfg.layer, cfg.facet, bin=cfg.bin)[0].float())
    reset_peak(device)
    t = median_time(lambda: best_buddies(descs[0], descs[1]), device, warmup, repeats)
    return Result(cfg, "pair/s", 1 / t, t, peak_gib(device),
                  extra={"tokens": [d.shape[0] for d in descs], "dim": descs[0].shape[1]})


BENCH = {"extract": bench_extract, "vos": bench_vos, "match": bench_match}


def format_table(results: List[Result]) -> str:
    head = f"{'configuration':58s} {'throughput':>14s} {'median s':>9s} {'peak GiB':>8s} " \
           f"{'fwd only':>10s} {'overhead':>8s} {'GFLOP':>8s} {'TFLOP/s':>8s}"
    rows = [head, "-" * len(head)]
    for r in results:
        fwd = f"{r.forward_throughput:10.2f}" if r.forward_throughput else f"{'':10s}"
        ovh = f"{r.overhead_pct:7.1f}%" if r.overhead_pct is not None else f"{'':8s}"
        gf = f"{r.gflop:8.1f}" if r.gflop else f"{'':8s}"
        tf = f"{r.tflops:8.3f}" if r.tflops else f"{'':8s}"
        rows.append(f"{r.config.name:58s} {r.throughput:9.2f} {r.unit:>4s} {r.median_s:9.4f} {r.peak_mem_gib:8.2f} "
                    f"{fwd} {ovh} {gf} {tf}")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--weights", default=None, help="weights file (default: the golden random weights; speed does "
                                                    "not depend on the values)")
    p.add_argument("--set", choices=["default", "gpu"], default=None,
                   help="configuration set (default: 'gpu' on CUDA, else 'default')")
    p.add_argument("--only", default=None, help="run only configurations whose name contains this text")
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=None, help="frames propagated per VOS run (default 16, GPU set 64)")
    p.add_argument("--out", default="results/speed.json", help="JSON output file")
    args = p.parse_args(argv)
    device = select_device(args.device)
    weights = args.weights or (str(golden_weights()) if golden_weights().is_file() else "random")
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    configs = gpu_configs() if (args.set or ("gpu" if device.type == "cuda" else "default")) == "gpu" \
        else default_configs()
    if args.only:
        configs = [c for c in configs if args.only in c.name]
    if args.frames:
        for c in configs:
            c.frames = args.frames
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "python": sys.version.split()[0]}
    print(f"# {machine}", flush=True)
    results, failed = [], []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every configuration: a run cut short keeps what it measured
        out.write_text(json.dumps({"machine": machine, "results": [asdict(r) for r in results], "failed": failed},
                                  indent=1))

    save()
    for cfg in configs:
        if device.type == "cpu" and cfg.dtype != "float32" and args.set != "gpu":
            continue
        try:
            res = BENCH[cfg.kind](cfg, weights, device, warmup, repeats)
        except Exception as exc:  # one configuration that cannot run (a backbone this timm lacks) is reported
            failed.append({"config": cfg.name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{cfg.name}: failed: {failed[-1]['error']}", flush=True)
        else:
            results.append(res)
            print(format_table([res]).splitlines()[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print()
    print(format_table(results))
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
