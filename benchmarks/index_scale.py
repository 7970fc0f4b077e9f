"""Patch-index scale benchmark: build time, size on disk and in memory, peak memory, query latency and recall@10.

    python benchmarks/index_scale.py real STORE [--kinds flat ivf-flat ivf-pq hnsw] [--queries 1000] [--out DIR]
    python benchmarks/index_scale.py synthetic [--sizes 1e6 3e6 1e7] [--queries 200] [--out DIR]

``real``: every token of a feature store (``densevit-extract --store``), each kind built in a fresh process
(peak RSS is that process's); queries are ``--queries`` stored tokens drawn at random (seed 0), searched one at
a time (latency per query: median, p95; exact flat search: the first 100); recall@10 = |top-10 ∩ exact top-10| / 10 against the ``flat`` kind
(exact), averaged over the queries. ``synthetic``: clustered 384-d unit vectors (4096 centres, variation in a 48-d subspace) generated chunk by chunk
(never all in memory), an IVF-PQ index (no store, so no exact re-ranking) at each size; recall against exact
search over the same vectors, regenerated chunk by chunk. Tables are printed and saved (CSV, Markdown, JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from densevit.cli.common import run_cli
from densevit.errors import DensevitError
from densevit.io.files import atomic_write_text

PROG = "index_scale.py"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_bytes(root: Path, names) -> int:
    return sum((root / n).stat().st_size for n in names)


# ------------------------------------------------------------------------------------------------ real store
def _timed_queries(search, queries):
    """Search each query row alone (after a warm-up): ``(ids Qx10, latency summary in ms)``."""
    search(queries[:5])
    lat, ids = [], []
    for row in queries:
        t = time.perf_counter()
        ids.append(search(row[None])[0])
        lat.append(time.perf_counter() - t)
    return np.stack(ids), {"latency_ms_median": 1000 * float(np.median(lat)),
                           "latency_ms_p95": 1000 * float(np.percentile(lat, 95))}


def _recall(got, exact) -> float:
    """Mean |top-10 ∩ exact top-10| / 10."""
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]))


def _sample_queries(store, n: int, layer, facet):
    """``n`` stored tokens drawn uniformly without replacement (seed 0; a smaller ``n`` takes a prefix)."""
    keys = store.images
    counts = np.array([store.grid(k).num_tokens for k in keys])
    starts = np.concatenate([[0], np.cumsum(counts)])
    picks = np.random.default_rng(0).permutation(int(starts[-1]))[:n]
    image = np.searchsorted(starts, picks, side="right") - 1
    token = picks - starts[image]
    rows = torch.empty(n, dtype=torch.long)
    out = [None] * n
    for im in np.unique(image):
        sel = np.nonzero(image == im)[0]
        d = store.descriptors(keys[im], layer, facet)[torch.from_numpy(token[sel])]
        for j, s in enumerate(sel):
            out[s] = d[j]
    del rows
    return torch.stack(out)


def run_one(args: argparse.Namespace) -> int:
    """One kind in this process: build, then search the queries one at a time; prints a JSON line."""
    from densevit.storage import patch_index as pi

    cfg = pi.IndexConfig(kind=args.one, nprobe=args.nprobe, rerank=args.rerank if args.one == "ivf-pq" else 0)
    out = Path(args.out) / f"index_{args.one}"
    t = time.perf_counter()
    index = pi.build_index(args.store, out, cfg, progress=False)
    build_s = time.perf_counter() - t
    build_peak = _peak_mib()
    q = _sample_queries(index.store, args.queries, index.meta["layer"], index.meta["facet"])
    search = lambda x: index.search_vectors(x, 10)[1]                    # noqa: E731
    ids, lat = _timed_queries(search, q[:100] if args.one == "flat" else q)  # exact search: 100 timed queries
    if args.one == "flat":                                                # the exact top-10 of every query
        ids = search(q)
    np.save(Path(args.out) / f"ids_{args.one}.npy", ids)
    print(json.dumps({"kind": args.one, "vectors": len(index), "dim": index.meta["dim"], "params": index.meta["params"],
                      "build_s": build_s, "disk_bytes": _dir_bytes(out, index.meta["files"]),
                      "memory_bytes": index.memory_bytes(), "peak_rss_mib": max(build_peak, _peak_mib()), **lat,
                      "rerank": cfg.rerank, "nprobe": cfg.nprobe, "device": str(index.device)}))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """Search settings of a built index (``--sweep DIR``): latency and recall@10 per (nprobe, rerank), against
    the flat run's exact results (``ids_flat.npy`` in ``--out``)."""
    from densevit.storage import patch_index as pi

    out = Path(args.out)
    index = pi.load_index(args.sweep, args.store)
    q = _sample_queries(index.store, args.queries, index.meta["layer"], index.meta["facet"])
    exact = np.load(out / "ids_flat.npy")
    rows = []
    for nprobe in args.nprobes:
        for rerank in args.reranks:
            cfg = index.config
            cfg.nprobe, cfg.rerank = nprobe, rerank
            index.meta["config"] = vars(cfg).copy()
            got, lat = _timed_queries(lambda x: index.search_vectors(x, 10)[1], q)
            r = {"kind": index.meta["kind"], "nprobe": nprobe, "rerank": rerank, **lat, "recall@10": _recall(got, exact)}
            rows.append(r)
            print(f"nprobe {nprobe:4d} rerank {rerank:4d}: {r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f} ms"
                  f"  recall@10 {r['recall@10']:.3f}", flush=True)
    lines = ["| nprobe | rerank | query median / p95 | recall@10 |", "|---|---|---|---|"]
    lines += [f"| {r['nprobe']} | {r['rerank']} | {r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f} ms | "
              f"{r['recall@10']:.3f} |" for r in rows]
    _write(out / f"index_scale_sweep_{index.meta['kind']}", rows, "\n".join(lines))
    return 0


def run_real(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(dict.fromkeys(["flat"] + args.kinds))                     # flat first: the exact reference
    rows = []
    for kind in kinds:
        cmd = [sys.executable, __file__, "real", args.store, "--one", kind, "--queries", str(args.queries),
               "--out", str(out), "--nprobe", str(args.nprobe), "--rerank", str(args.rerank)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DensevitError(f"{kind} failed:\n{r.stderr[-2000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        exact = np.load(out / "ids_flat.npy")
        got = np.load(out / f"ids_{kind}.npy")
        row["recall@10"] = _recall(got, exact)
        row["raw_float32_bytes"] = row["vectors"] * row["dim"] * 4
        rows.append(row)
        print(_fmt_real(row), flush=True)
    _write(out / "index_scale_real", rows, _table_real(rows))
    return 0


def _fmt_real(r) -> str:
    return (f"{r['kind']:<9} {r['vectors']:>9} vec  build {r['build_s']:7.1f} s  disk {r['disk_bytes'] / 2**20:8.1f} MiB  "
            f"mem {r['memory_bytes'] / 2**20:8.1f} MiB ({100 * r['memory_bytes'] / r['raw_float32_bytes']:5.1f}% of "
            f"float32)  peak {r['peak_rss_mib']:7.0f} MiB  query {r['latency_ms_median']:6.2f} / "
            f"{r['latency_ms_p95']:6.2f} ms  recall@10 {r['recall@10']:.3f}  ({r.get('device', 'cpu')})")


def _table_real(rows) -> str:
    lines = ["| kind | vectors | parameters | build | on disk | in memory (% of float32) | peak RSS | query median / p95 "
             "| recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = dict(r["params"], **({"nprobe": r["nprobe"]} if "nlist" in r["params"] else {}),
                 **({"rerank": r["rerank"]} if r["rerank"] else {}))
        lines.append(f"| {r['kind']} | {r['vectors']:,} | {', '.join(f'{k} {v}' for k, v in p.items()) or '-'} | "
                     f"{r['build_s']:.1f} s | {r['disk_bytes'] / 2**20:.0f} MiB | {r['memory_bytes'] / 2**20:.0f} MiB "
                     f"({100 * r['memory_bytes'] / r['raw_float32_bytes']:.1f}%) | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                     f"{r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f} ms | {r['recall@10']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ synthetic
DIM, CENTERS, CHUNK = 384, 4096, 500_000


def _chunk(i: int, n: int, centers: torch.Tensor) -> np.ndarray:
    """Chunk ``i`` (``n`` rows) of the synthetic collection: cluster centre + noise, unit length."""
    g = torch.Generator().manual_seed(1000 + i)
    lab = torch.randint(0, centers.shape[0], (n,), generator=g)
    return torch.nn.functional.normalize(centers[lab] + _noise(n, g), dim=1).numpy()


def _noise(n: int, g: torch.Generator) -> torch.Tensor:
    """Within-cluster variation in a fixed 48-d subspace (dense descriptors have a low intrinsic dimension)."""
    basis = torch.randn(48, DIM, generator=torch.Generator().manual_seed(1)) / math.sqrt(DIM)
    return 0.5 * torch.randn(n, 48, generator=g) @ basis


def run_synthetic_one(args: argparse.Namespace) -> int:
    import faiss

    n = int(float(args.one))
    centers = torch.nn.functional.normalize(torch.randn(CENTERS, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    chunks = [(i, min(CHUNK, n - i * CHUNK)) for i in range(math.ceil(n / CHUNK))]
    nlist = min(4096, 2 ** round(math.log2(4 * math.sqrt(n))))
    t = time.perf_counter()
    train = np.concatenate([_chunk(i, c, centers)[: max(1, 200_000 * c // n)] for i, c in chunks])
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, nlist, DIM // 4, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    del train
    for i, c in chunks:
        index.add(_chunk(i, c, centers))
    build_s = time.perf_counter() - t
    index.nprobe = args.nprobe
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(centers[torch.randint(0, CENTERS, (args.queries,), generator=g)]
                                      + _noise(args.queries, g), dim=1).numpy()
    got, lat = _timed_queries(lambda x: index.search(x, 10)[1], q)
    best_s = np.full((len(q), 10), -np.inf, np.float32)                 # exact top-10, chunk by chunk
    best_i = np.zeros((len(q), 10), np.int64)
    for i, c in chunks:
        s = q @ _chunk(i, c, centers).T
        top = np.argpartition(-s, 10, axis=1)[:, :10]
        cs = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        ci = np.concatenate([best_i, top + i * CHUNK], 1)
        o = np.argsort(-cs, 1)[:, :10]
        best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
    recall = _recall(got, best_i)
    mem = int(faiss.serialize_index(index).size)
    print(json.dumps({"vectors": n, "nlist": nlist, "pq_m": DIM // 4, "nprobe": args.nprobe, "build_s": build_s,
                      "memory_bytes": mem, "raw_float32_bytes": n * DIM * 4, "peak_rss_mib": _peak_mib(), **lat,
                      "recall@10": recall}))
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "synthetic", "--one", str(size), "--queries", str(args.queries),
               "--nprobe", str(args.nprobe)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DensevitError(f"{size} vectors failed:\n{r.stderr[-2000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['vectors']:>10,} vec  nlist {row['nlist']}  build {row['build_s']:7.1f} s  mem "
              f"{row['memory_bytes'] / 2**20:7.0f} MiB ({100 * row['memory_bytes'] / row['raw_float32_bytes']:.1f}%)  "
              f"peak {row['peak_rss_mib']:6.0f} MiB  query {row['latency_ms_median']:.2f} / {row['latency_ms_p95']:.2f} ms"
              f"  recall@10 {row['recall@10']:.3f}", flush=True)
    lines = ["| vectors | nlist | build | in memory (% of float32) | peak RSS | query median / p95 | recall@10 (PQ only) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vectors']:,} | {r['nlist']} | {r['build_s']:.0f} s | {r['memory_bytes'] / 2**20:.0f} MiB "
                     f"({100 * r['memory_bytes'] / r['raw_float32_bytes']:.1f}%) | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                     f"{r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f} ms | {r['recall@10']:.3f} |")
    _write(out / "index_scale_synthetic", rows, "\n".join(lines))
    return 0


def _write(stem: Path, rows, table: str) -> None:
    atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), table + "\n")
    keys = list(rows[0])
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(json.dumps(r[k]).replace(",", ";") for k in keys) + "\n")
    print("\n" + table + f"\n\nwrote {stem}.md / .csv / .json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("real", help="every token of a feature store")
    r.add_argument("store")
    r.add_argument("--kinds", nargs="+", default=["flat", "ivf-flat", "ivf-pq", "hnsw"])
    r.add_argument("--queries", type=int, default=1000)
    r.add_argument("--nprobe", type=int, default=16)
    r.add_argument("--rerank", type=int, default=1000)
    r.add_argument("--out", default="results/index_scale")
    r.add_argument("--one", default=None, help=argparse.SUPPRESS)
    r.add_argument("--sweep", default=None, help="a built index folder: search settings sweep instead of building")
    r.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64])
    r.add_argument("--reranks", type=int, nargs="+", default=[100, 200, 400])
    s = sub.add_parser("synthetic", help="synthetic growth (IVF-PQ)")
    s.add_argument("--sizes", nargs="+", default=["1e6", "3e6", "1e7"])
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--nprobe", type=int, default=16)
    s.add_argument("--out", default="results/index_scale")
    s.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.mode == "real":
        return run_one(args) if args.one else run_sweep(args) if args.sweep else run_real(args)
    return run_synthetic_one(args) if args.one else run_synthetic(args)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
