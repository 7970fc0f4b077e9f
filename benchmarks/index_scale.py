"""Patch-index scale benchmark: build time, size on disk and in memory, peak memory, query latency and recall@10.

    python benchmarks/index_scale.py real STORE [--kinds flat ivf-flat ivf-pq hnsw] [--queries 1000] [--out DIR]
    python benchmarks/index_scale.py synthetic [--sizes 1e6 3e6 1e7] [--queries 200] [--out DIR]
    python benchmarks/index_scale.py ondisk [--sizes 1e6 1e7 1e8] [--ranks 1 2] [--queries 200] [--work DIR] [--out DIR]
    python benchmarks/index_scale.py merge [--vectors 1e8] [--work DIR] [--out DIR] [--keep-indexes]

``real``: every token of a feature store (``densevit-extract --store``), each kind built in a fresh process
(peak RSS is that process's); queries are ``--queries`` stored tokens drawn at random (seed 0), searched one at
a time (latency per query: median, p95; exact flat search: the first 100); recall@10 = |top-10 ∩ exact top-10| / 10 against the ``flat`` kind
(exact), averaged over the queries. ``synthetic``: clustered 384-d unit vectors (4096 centres, variation in a 48-d subspace) generated chunk by chunk
(never all in memory), an IVF-PQ index (no store, so no exact re-ranking) at each size; recall against exact
search over the same vectors, regenerated chunk by chunk. ``ondisk``: the sharded on-disk build
(:mod:`densevit.storage.ondisk`, the engine of ``densevit-index build --on-disk``) under torchrun with 1 and 2 ranks at
each size, over a synthetic store of the same distribution whose vector ``i`` is a function of ``i`` alone
(:func:`synthetic_vectors`: any id regenerated at random access, so candidates are re-ranked exactly from it without
writing 100 M x 384 float16 = 77 GB); per rank: build time, peak RSS (``VmHWM``, which counts the page cache of
mapped files it touched) and peak anonymous memory (sampled every 0.1 s; a resumed build takes the largest over
its runs, each recorded with the stage it finished); bytes on disk; query median / p95 and
recall@10 per (nprobe, rerank) against exact top-10 over all vectors for ``--queries`` queries; whether the ranks'
lists are byte-identical; and a model of each figure at 1 B. ``merge``: the merge stage alone at ``--vectors``, on
parts laid out as ``ondisk`` writes them (``PART`` vectors each, ids ascending, the same ``nlist`` and code size)
holding random codes in pseudo-random lists (the merge copies bytes, whatever they encode): merge time and the
merging process's anonymous memory before and at peak; ``--keep-indexes`` keeps every opened part's index (coarse
quantizer, PQ tables) alive during the merge, as the build did before it took only their lists.
Tables are printed and saved (CSV, Markdown, JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from densevit.cli.common import run_cli
from densevit.errors import DensevitError
from densevit.io.files import atomic_write_text, file_sha256

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
                      "rerank": cfg.rerank, "nprobe": cfg.probes(index.meta["params"]["nlist"]) if "nlist" in index.meta["params"]
                      else None, "device": str(index.device)}))
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
               "--out", str(out), "--rerank", str(args.rerank)] + ([] if args.nprobe is None else ["--nprobe", str(args.nprobe)])
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

    n = args.one
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
    lines = [",".join(keys)] + [",".join(json.dumps(r[k]).replace(",", ";") for k in keys) for r in rows]
    atomic_write_text(stem.with_suffix(".csv"), "\n".join(lines) + "\n")
    print("\n" + table + f"\n\nwrote {stem}.md / .csv / .json")


# ------------------------------------------------------------------------------------------------ on disk
PART = 250_000              # vectors per part (a rank's memory bound; several parts per rank)
TRAIN = 200_000             # training sample (FAISS wants >= 39 per list)
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of a uint64 counter array (a counter-based random number per element)."""
    with np.errstate(over="ignore"):
        z = x * _GOLD + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _centers_basis():
    centers = torch.nn.functional.normalize(torch.randn(CENTERS, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    basis = torch.randn(48, DIM, generator=torch.Generator().manual_seed(1)) / math.sqrt(DIM)
    return centers.numpy(), basis.numpy()


def synthetic_vectors(ids: np.ndarray, cb=None, salt: int = 0) -> np.ndarray:
    """Vectors ``ids`` of the synthetic store: a cluster centre (4096, seed 0) + 0.5 x Gaussian variation in a fixed
    48-d subspace (seed 1), unit length -- the ``synthetic`` mode's distribution -- with every random number a
    function of the id (random access). ``salt`` draws another set (the queries)."""
    centers, basis = cb or _centers_basis()
    c = (np.asarray(ids, np.uint64) * np.uint64(64) + np.uint64(salt) * np.uint64(1 << 40))[:, None]
    u = (_mix(c + np.arange(49, dtype=np.uint64)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    r = np.sqrt(-2 * np.log(np.maximum(u[:, :24], 1e-300)))
    z = np.concatenate([r * np.cos(2 * np.pi * u[:, 24:48]), r * np.sin(2 * np.pi * u[:, 24:48])], 1)
    lab = (u[:, 48] * CENTERS).astype(np.int64)
    x = centers[lab] + 0.5 * (z.astype(np.float32) @ basis)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


class _PeakAnon:
    """Peak anonymous memory (``RssAnon``) of this process, sampled every 0.1 s on a thread."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.status("RssAnon"))

    def now(self) -> dict:
        """This process's peaks so far (bytes), for a record a resumed run reads back."""
        return {"peak_anon": max(self.peak, self.status("RssAnon")), "peak_rss": self.status("VmHWM")}

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, self.status("RssAnon"))


def _count(text: str) -> int:
    """A vector count flag (``1e8``, ``250000``): a whole number >= 1, else a one-line usage error."""
    try:
        n = float(text)
    except ValueError:
        n = 0.0
    if not (n >= 1 and n == int(n)):
        raise argparse.ArgumentTypeError(f"not a vector count >= 1: {text!r} (e.g. 1e6)")
    return int(n)


def _nlist(n: int) -> int:
    return min(4096, 2 ** round(math.log2(4 * math.sqrt(n))))


class _Top10:
    """The running exact top-10 (inner product) of each query over the vectors seen so far."""

    def __init__(self, nq: int):
        self.s = np.full((nq, 10), -np.inf, np.float32)
        self.i = np.zeros((nq, 10), np.int64)

    def update(self, s: np.ndarray, ids: np.ndarray) -> None:
        """``s`` QxN scores of the vectors ``ids`` (N)."""
        top = np.argpartition(-s, 10, axis=1)[:, :10] if s.shape[1] > 10 else np.tile(np.arange(s.shape[1]),
                                                                                       (len(s), 1))
        self.fold(np.take_along_axis(s, top, 1), ids[top])

    def fold(self, s: np.ndarray, i: np.ndarray) -> None:
        """Fold another top-k (``s`` scores, ``i`` ids, QxK) into this one."""
        cs, ci = np.concatenate([self.s, s], 1), np.concatenate([self.i, i], 1)
        o = np.argsort(-cs, 1, kind="stable")[:, :10]
        self.s, self.i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)


def run_ondisk_one(args: argparse.Namespace) -> int:
    """One build of ``--one`` vectors in ``--work`` by this rank (alone or under torchrun), then (rank 0) the search
    sweep; prints a JSON line (rank 0). Resumable: the trained tables, every encoded part (with its encode time and
    the exact top-10 of the queries over its vectors, computed from the same generated chunks) and the merged index
    are kept in ``--work``, and a rerun does only what is missing."""
    import faiss

    from densevit.runtime import dist
    from densevit.storage import ondisk

    n = args.one
    work = Path(args.work)
    anon = _PeakAnon()
    cb = _centers_basis()
    q = synthetic_vectors(np.arange(args.queries), cb, salt=1)
    parts = [(i, s, min(s + PART, n)) for i, s in enumerate(range(0, n, PART))]
    merged = (work / "merge.json").is_file()
    with dist.session(timeout_minutes=600) as ctx:
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        nlist = _nlist(n)

        def train():
            if (work / "train.json").is_file():
                return ondisk.index_to_bytes(faiss.read_index(str(work / "trained.faiss")))
            ids = np.sort(np.random.default_rng(0).choice(n, min(n, TRAIN), replace=False))
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, nlist, DIM // 4, 8, faiss.METRIC_INNER_PRODUCT)
            with ondisk.all_threads():
                index.train(synthetic_vectors(ids, cb))
            ondisk.write_index(index, work / "trained.faiss")
            atomic_write_text(work / "train.json", json.dumps({"train_s": time.perf_counter() - t0, **anon.now()}))
            return ondisk.index_to_bytes(index)

        trained = ctx.on_main(train)
        train_s = json.loads((work / "train.json").read_text())["train_s"] if ctx.is_main else 0.0
        mine = ctx.shard(parts, [e - s for _, s, e in parts])
        chunk = 100_000
        from tqdm import tqdm

        seconds = 0.0
        todo = [] if merged else [(i, s, e) for i, s, e in mine if not (work / f"part-{i:05d}.json").is_file()]
        resumed = merged or len(todo) < len(mine)
        with tqdm(total=sum(e - s for _, s, e in todo), desc=f"encoding (rank {ctx.rank})", unit="vec",
                  unit_scale=True, disable=not ctx.is_main or args.quiet) as bar:
            for i, s, e in todo:
                t = time.perf_counter()
                top = _Top10(len(q))

                def chunks(s=s, e=e, top=top):
                    for a in range(s, e, chunk):
                        b = min(a + chunk, e)
                        x, ids = synthetic_vectors(np.arange(a, b), cb), np.arange(a, b, dtype=np.int64)
                        top.update(q @ x.T, ids)
                        yield x, ids
                        bar.update(b - a)
                ondisk.encode_part(trained, chunks(), work / f"part-{i:05d}.faiss")
                np.savez(work / f"part-{i:05d}.top.npz", s=top.s, i=top.i)
                atomic_write_text(work / f"part-{i:05d}.json", json.dumps({"encode_s": time.perf_counter() - t,
                                                                              **anon.now()}))
        records = [work / f"part-{i:05d}.json" for i, _, _ in mine] + (
            [work / "train.json", work / "merge.json"] if ctx.is_main else [])
        for i, _, _ in mine:                         # this rank's encode time, summed over runs when resumed
            seconds += json.loads((work / f"part-{i:05d}.json").read_text())["encode_s"]
        ctx.barrier()
        if ctx.is_main and not merged:
            t1 = time.perf_counter()
            with ondisk.lists_of(ondisk.open_part(work / f"part-{i:05d}.faiss") for i, _, _ in parts) as sources:
                ondisk.merge_lists(trained, sources, work / "lists.ivfdata", work / "ivf.faiss")
            top = _Top10(len(q))
            for i, _, _ in parts:
                z = np.load(work / f"part-{i:05d}.top.npz")
                top.fold(z["s"], z["i"])
            np.save(_exact_cache(work, n, len(q)), top.i)
            atomic_write_text(work / "merge.json", json.dumps({"merge_s": time.perf_counter() - t1, **anon.now()}))
            for i, _, _ in parts:
                (work / f"part-{i:05d}.faiss").unlink()
        merge_s = json.loads((work / "merge.json").read_text())["merge_s"] if ctx.is_main else 0.0
        earlier = [json.loads(f.read_text()) for f in records if f.is_file()]   # peaks of earlier runs, if resumed
        mem = ctx.gather({"peak_rss": max([_PeakAnon.status("VmHWM")] + [r.get("peak_rss", 0) for r in earlier]),
                          "peak_anon": max([anon.stop()] + [r.get("peak_anon", 0) for r in earlier]),
                          "encode_s": seconds, "resumed": resumed})
    if not ctx.is_main:
        return 0
    encode_s = max(m["encode_s"] for m in mem)
    row = {"vectors": n, "ranks": ctx.world_size, "nlist": nlist, "pq_m": DIM // 4, "train_s": train_s,
           "encode_s": encode_s, "merge_s": merge_s, "build_s": train_s + encode_s + merge_s,
           "resumed": any(m["resumed"] for m in mem),
           "peak_rss_mib": [m["peak_rss"] / 2**20 for m in mem], "peak_anon_mib": [m["peak_anon"] / 2**20 for m in mem],
           "lists_bytes": (work / "lists.ivfdata").stat().st_size, "index_bytes": (work / "ivf.faiss").stat().st_size,
           "files_sha256": [file_sha256(work / "lists.ivfdata"), file_sha256(work / "ivf.faiss")]}
    if args.search:
        row["search"] = _ondisk_search(work, n, args, cb)
    print(json.dumps(row))
    return 0


def _exact_cache(work: Path, n: int, nq: int) -> Path:
    return work.parent / f"exact_{n}_{nq}.npy"


def _exact_top10(n: int, q: np.ndarray, cb, cache: Path) -> np.ndarray:
    """Exact top-10 ids of every query over all ``n`` vectors (regenerated chunk by chunk); cached per size (the
    build leaves it there when it computed it while encoding)."""
    if cache.is_file():
        return np.load(cache)
    top = _Top10(len(q))
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        top.update(q @ synthetic_vectors(np.arange(a, b), cb).T, np.arange(a, b, dtype=np.int64))
    np.save(cache, top.i)
    return top.i


def _ondisk_search(work: Path, n: int, args: argparse.Namespace, cb):
    """Search the on-disk index: per (nprobe, rerank), query median / p95 (one query at a time, re-ranking
    included) and recall@10 against the exact top-10."""
    from densevit.storage import ondisk

    index = ondisk.open_index(work / "ivf.faiss")
    q = synthetic_vectors(np.arange(args.queries), cb, salt=1)
    exact = _exact_top10(n, q, cb, _exact_cache(Path(args.work), n, args.queries))
    rows = []
    for nprobe in args.nprobes:
        for rerank in args.reranks:
            index.nprobe = nprobe

            def search(x):
                _, cand = index.search(x, max(10, rerank))
                if rerank == 0:
                    return cand[:, :10]
                flat = cand.reshape(-1)
                ok = flat >= 0
                vec = np.zeros((flat.size, DIM), np.float32)
                vec[ok] = synthetic_vectors(flat[ok], cb)                 # the "store" read, by id
                sims = np.einsum("qd,qcd->qc", x, vec.reshape(cand.shape[0], cand.shape[1], -1))
                sims[cand < 0] = -np.inf
                return np.take_along_axis(cand, np.argsort(-sims, 1, kind="stable")[:, :10], 1)

            got, lat = _timed_queries(search, q)
            r = {"nprobe": nprobe, "rerank": rerank, **lat, "recall@10": _recall(got, exact)}
            print(f"  {n:,} vectors: nprobe {nprobe:4d} rerank {rerank:4d}: {r['latency_ms_median']:.2f} / "
                  f"{r['latency_ms_p95']:.2f} ms  recall@10 {r['recall@10']:.3f}", file=sys.stderr, flush=True)
            rows.append(r)
    return rows


def run_ondisk(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        n = size
        for ranks in args.ranks:
            wd = work / f"{n}_{ranks}"
            last = ranks == args.ranks[-1]
            cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                   if ranks > 1 else [sys.executable]) + [
                __file__, "ondisk", "--one", str(n), "--work", str(wd), "--queries", str(args.queries),
                "--nprobes", *map(str, args.nprobes), "--reranks", *map(str, args.reranks)] + (
                ["--search"] if last else []) + (["--quiet"] if args.quiet else [])
            env = dict(os.environ, OMP_NUM_THREADS="1")     # what torchrun gives each rank, alone too
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if r.returncode != 0:
                raise DensevitError(f"{n} vectors on {ranks} rank(s) failed (exit {r.returncode})")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{n:>12,} vec  {ranks} rank(s)  build {row['build_s']:7.1f} s (train {row['train_s']:.0f}, encode "
                  f"{row['encode_s']:.0f}, merge {row['merge_s']:.0f})  peak RSS {max(row['peak_rss_mib']):.0f} MiB, "
                  f"anon {max(row['peak_anon_mib']):.0f} MiB  lists {row['lists_bytes'] / 2**20:.0f} MiB", flush=True)
        same = {tuple(r["files_sha256"]) for r in rows if r["vectors"] == n}
        for r in rows:
            if r["vectors"] == n:
                r["ranks_identical"] = len(same) == 1 if len(args.ranks) > 1 else None
        for ranks in args.ranks[:-1]:                # keep the last build (searched); the others only for the check
            shutil.rmtree(work / f"{n}_{ranks}", ignore_errors=True)
    _write(out / "index_scale_ondisk", rows, _table_ondisk(rows))
    return 0


def _table_ondisk(rows) -> str:
    lines = ["| vectors | ranks | nlist | build (train / encode / merge) | peak RSS per rank | peak anonymous per rank | "
             "lists on disk | in memory | 1 = 2 ranks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vectors']:,} | {r['ranks']} | {r['nlist']} | {r['build_s']:.0f} s ({r['train_s']:.0f} / "
                     f"{r['encode_s']:.0f} / {r['merge_s']:.0f}) | "
                     f"{' / '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} MiB | "
                     f"{' / '.join(f'{m:.0f}' for m in r['peak_anon_mib'])} MiB | {r['lists_bytes'] / 2**30:.2f} GiB | "
                     f"{r['index_bytes'] / 2**20:.1f} MiB | "
                     f"{'-' if r.get('ranks_identical') is None else ('identical' if r['ranks_identical'] else 'DIFFER')} |")
    lines += ["", "| vectors | nprobe | rerank | query median / p95 | recall@10 |", "|---|---|---|---|---|"]
    for r in rows:
        for s in r.get("search", []):
            lines.append(f"| {r['vectors']:,} | {s['nprobe']} | {s['rerank']} | {s['latency_ms_median']:.2f} / "
                         f"{s['latency_ms_p95']:.2f} ms | {s['recall@10']:.3f} |")
    return "\n".join(lines)


def model_1b(rows, merges=(), cores=(2, 64), disk_gbps: float = 1.0, iops: float = 100_000, target: float = 1e9):
    """Each figure of the ``ondisk`` rows modelled at ``target`` vectors, from the largest measured size, with the
    assumptions stated in the table: encoding per core constant per vector (same nlist), lists and id map linear
    in N, merge bound by ``disk_gbps`` (read + write once), probed lists read from disk at ``disk_gbps`` when the
    lists exceed the page cache, re-ranking 1000 random store reads at ``iops``; ``merges`` (rows of the ``merge``
    mode) give rank 0's merge memory, scaled with the number of parts."""
    big = max(rows, key=lambda r: (r["vectors"], r["ranks"]))
    n, ranks = big["vectors"], big["ranks"]
    per_core = n / (big["encode_s"] * ranks)                      # vectors a second a core (OMP_NUM_THREADS=1)
    entry = big["lists_bytes"] / n
    lists, ids = entry * target, 12 * target
    out = [("lists on disk", f"{big['lists_bytes'] / 2**30:.2f} GiB", f"{lists / 2**30:.0f} GiB",
            f"{entry:.0f} bytes a vector (code + id), linear"),
           ("id map", f"{12 * n / 2**30:.2f} GiB", f"{ids / 2**30:.0f} GiB", "12 bytes a vector"),
           ("peak disk while building", f"{2 * (big['lists_bytes'] + 12 * n) / 2**30:.2f} GiB",
            f"{2 * (lists + ids) / 2**30:.0f} GiB", "parts + merged lists, both id maps")]
    for c in cores:
        out.append((f"encoding on {c} cores", f"{big['encode_s']:.0f} s on {ranks}", f"{target / (per_core * c) / 3600:.1f} h",
                    f"{per_core:,.0f} vectors/s a core, nlist {big['nlist']} (a larger nlist costs proportionally "
                    f"more with a flat quantiser)"))
    out.append(("training", f"{big['train_s']:.0f} s", f"{big['train_s']:.0f} s",
                f"the same {TRAIN:,}-vector sample and nlist {big['nlist']}"))
    out.append(("merge", f"{big['merge_s']:.1f} s", f"{2 * lists / (disk_gbps * 1e9) / 60:.0f} min",
                f"read + write the lists once at {disk_gbps:g} GB/s"))
    anon = big["peak_anon_mib"]
    if len(anon) > 1:
        out.append(("peak anonymous memory, encoding ranks", " / ".join(f"{m:.0f} MiB" for m in anon[1:]),
                    " / ".join(f"{m:.0f} MiB" for m in anon[1:]), "independent of N: trained index + one part + one chunk"))
    merge = max(merges, key=lambda m: m["vectors"]) if merges else None
    if merge is None:
        out.append(("peak anonymous memory, rank 0", f"{anon[0]:.0f} MiB", f"{anon[0]:.0f} MiB",
                    "independent of N: the training sample, trained index, one part"))
    else:                                                        # training bounds rank 0 unless the merge does
        train_peak = max(r["peak_anon_mib"][0] for r in rows if r["vectors"] < n) if any(
            r["vectors"] < n for r in rows) else anon[0]
        per_part = (merge["peak_anon_mib"] - merge["anon_before_mib"]) / merge["parts"]
        at = merge["anon_before_mib"] + per_part * merge["parts"] * target / merge["vectors"]
        out.append(("peak anonymous memory, rank 0", f"{anon[0]:.0f} MiB in the build; training {train_peak:.0f} MiB; "
                    f"the merge alone {merge['anon_before_mib']:.0f} -> "
                    f"{merge['peak_anon_mib']:.0f} MiB over {merge['parts']} parts",
                    f"{max(train_peak, at):.0f} MiB", f"training's peak (independent of N), or the merge's: "
                    f"{1024 * per_part:.0f} KiB a part (its list directory), {target / merge['vectors'] * merge['parts']:,.0f} parts"))
    search = {(s["nprobe"], s["rerank"]): s for s in big.get("search", [])}
    if search:
        nprobe = max(k[0] for k in search if k[1] == 0)
        s0 = search[(nprobe, 0)]
        scanned = nprobe * n / big["nlist"]
        per_code = s0["latency_ms_median"] / 1000 / scanned
        t_cached = nprobe * target / big["nlist"] * per_code
        t_disk = nprobe * target / big["nlist"] * entry / (disk_gbps * 1e9)
        out.append((f"query, nprobe {nprobe}, no re-ranking", f"{s0['latency_ms_median']:.1f} ms",
                    f"{1000 * t_cached:.0f} ms cached / {1000 * (t_cached + t_disk):.0f} ms from disk",
                    f"{per_code * 1e9:.1f} ns a scanned code; the probed lists ({nprobe} x {target / big['nlist']:,.0f} "
                    f"codes) read at {disk_gbps:g} GB/s when not in the page cache"))
        wide = 65536
        t_wide = nprobe * target / wide * per_code
        out.append((f"query, nlist {wide}, nprobe {nprobe}, no re-ranking", "-",
                    f"{1000 * t_wide:.0f} ms cached / {1000 * (t_wide + nprobe * target / wide * entry / (disk_gbps * 1e9)):.0f}"
                    f" ms from disk", "FAISS's billion-scale list count (an HNSW coarse quantiser to encode); recall "
                    "at a given nprobe is not modelled: it falls as each probed list covers less of the space"))
        out.append(("re-ranking 1000 candidates", "-", f"{1000 * 1000 / iops:.0f} ms from disk",
                    f"1000 random reads of a float16 descriptor from the store at {iops:,.0f} IOPS (page cache: "
                    f"well under 1 ms)"))
    lines = [f"| figure | measured at {n:,} | model at {target:,.0f} | assumption |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in out]
    return "\n".join(lines)


def run_merge(args: argparse.Namespace) -> int:
    """The merge stage alone (see the module's docstring); prints and saves one row."""
    import faiss

    from densevit.storage import ondisk

    n, cs = args.vectors, DIM // 4
    work = Path(args.work) / f"merge_{n}"
    need, free = 2 * n * (cs + ondisk.LIST_ENTRY_OVERHEAD), ondisk.free_bytes(args.work)   # the parts + the lists
    if free is not None and free < need:
        raise DensevitError(f"{args.work} has {free / 2**30:.1f} GiB free; the merge of {n:,} vectors needs "
                            f"{need / 2**30:.1f} GiB (parts + lists)")
    work.mkdir(parents=True, exist_ok=True)
    nlist = _nlist(n)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, nlist, DIM // 4, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = index.pq.cp.niter = 2            # any trained tables do: the merge never reads them
    index.train(np.random.default_rng(0).standard_normal((nlist * 40, DIM)).astype(np.float32))
    trained = ondisk.index_to_bytes(index)
    del index
    parts = [(i, s, min(s + PART, n)) for i, s in enumerate(range(0, n, PART))]
    from tqdm import tqdm

    for i, s, e in tqdm(parts, desc="writing parts", disable=args.quiet):
        path = work / f"part-{i:05d}.faiss"
        if path.is_file():
            continue
        part = ondisk.index_from_bytes(trained)
        ivf = faiss.extract_index_ivf(part)
        ids = np.arange(s, e, dtype=np.int64)
        lists = (ids * 2654435761) % nlist
        order = np.argsort(lists, kind="stable")
        ids, bounds = ids[order], np.searchsorted(lists[order], np.arange(nlist + 1))
        codes = np.random.default_rng(i).integers(0, 256, (len(ids), cs), dtype=np.uint8)
        for li in np.flatnonzero(np.diff(bounds)):    # a loop over lists (nlist), numpy inside
            a, b = bounds[li], bounds[li + 1]
            lid, lcode = np.ascontiguousarray(ids[a:b]), np.ascontiguousarray(codes[a:b])
            ivf.invlists.add_entries(int(li), int(b - a), faiss.swig_ptr(lid), faiss.swig_ptr(lcode))
        ivf.ntotal = part.ntotal = e - s
        ondisk.write_index(part, path)
    before = _PeakAnon.status("RssAnon")
    anon, t = _PeakAnon(), time.perf_counter()
    kept = []

    def opened():
        for i, _, _ in parts:
            part = ondisk.open_part(work / f"part-{i:05d}.faiss")
            if args.keep_indexes:
                kept.append(part)
            yield part
    with ondisk.lists_of(opened()) as sources:
        merged = ondisk.merge_lists(trained, sources, work / "lists.ivfdata", work / "ivf.faiss")
    merge_s, peak = time.perf_counter() - t, anon.stop()
    kept.clear()
    row = {"vectors": n, "parts": len(parts), "nlist": nlist, "code_size": cs, "keep_indexes": bool(args.keep_indexes),
           "merged": merged, "merge_s": merge_s, "anon_before_mib": before / 2**20, "peak_anon_mib": peak / 2**20,
           "lists_bytes": (work / "lists.ivfdata").stat().st_size}
    written = ["lists.ivfdata", "ivf.faiss"] + ([] if args.keep_parts else [f"part-{i:05d}.faiss" for i, _, _ in parts])
    for f in written:                                # only what this mode wrote: the folder may hold more
        (work / f).unlink()
    if not any(work.iterdir()):
        work.rmdir()
    line = (f"merge {n:,} vectors ({len(parts)} parts, nlist {nlist}{', indexes kept' if args.keep_indexes else ''}): "
            f"{merge_s:.0f} s, anonymous memory {row['anon_before_mib']:.0f} MiB before, "
            f"{row['peak_anon_mib']:.0f} MiB at peak")
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"index_scale_merge_{n}{'_kept' if args.keep_indexes else ''}.json"
    atomic_write_text(out / name, json.dumps(row, indent=1) + "\n")
    return 0


def run_model(args: argparse.Namespace) -> int:
    rows = [r for f in args.inputs for r in json.loads(Path(f).read_text())]
    merges = [json.loads(Path(f).read_text()) for f in args.merge]
    table = model_1b(rows, [m for m in merges if not m["keep_indexes"]], disk_gbps=args.disk_gbps, iops=args.iops)
    print(table)
    atomic_write_text(Path(args.out) / "index_scale_model_1b.md", table + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("real", help="every token of a feature store")
    r.add_argument("store")
    r.add_argument("--kinds", nargs="+", default=["flat", "ivf-flat", "ivf-pq", "hnsw"])
    r.add_argument("--queries", type=int, default=1000)
    r.add_argument("--nprobe", type=int, default=None, help="default: the index's (a quarter of the lists, at least 16)")
    r.add_argument("--rerank", type=int, default=1000)
    r.add_argument("--out", default="results/index_scale")
    r.add_argument("--one", default=None, help=argparse.SUPPRESS)
    r.add_argument("--sweep", default=None, help="a built index folder: search settings sweep instead of building")
    r.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64])
    r.add_argument("--reranks", type=int, nargs="+", default=[100, 200, 400])
    s = sub.add_parser("synthetic", help="synthetic growth (IVF-PQ)")
    s.add_argument("--sizes", nargs="+", type=_count, default=[10 ** 6, 3 * 10 ** 6, 10 ** 7])
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--nprobe", type=int, default=16)
    s.add_argument("--out", default="results/index_scale")
    s.add_argument("--one", type=_count, default=None, help=argparse.SUPPRESS)
    o = sub.add_parser("ondisk", help="the sharded on-disk build (torchrun), synthetic store")
    o.add_argument("--sizes", nargs="+", type=_count, default=[10 ** 6, 10 ** 7, 10 ** 8])
    o.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    o.add_argument("--queries", type=int, default=200)
    o.add_argument("--nprobes", type=int, nargs="+", default=[16, 64, 256, 1024])
    o.add_argument("--reranks", type=int, nargs="+", default=[0, 1000])
    o.add_argument("--work", default="results/index_scale/ondisk_work", help="where the indexes are built")
    o.add_argument("--out", default="results/index_scale")
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--search", action="store_true", help=argparse.SUPPRESS)
    o.add_argument("--one", type=_count, default=None, help=argparse.SUPPRESS)
    g = sub.add_parser("merge", help="the ondisk merge stage alone, on parts of random codes")
    g.add_argument("--vectors", type=_count, default=10 ** 8)
    g.add_argument("--work", default="results/index_scale/ondisk_work", help="where the parts are written")
    g.add_argument("--out", default="results/index_scale")
    g.add_argument("--keep-indexes", action="store_true", help="keep each opened part's index during the merge")
    g.add_argument("--keep-parts", action="store_true", help="keep the parts for another run")
    g.add_argument("--quiet", action="store_true")
    m = sub.add_parser("model", help="the ondisk figures modelled at 1 B vectors")
    m.add_argument("inputs", nargs="+", help="index_scale_ondisk.json files")
    m.add_argument("--merge", nargs="*", default=[], help="index_scale_merge_*.json files (rank 0's merge memory)")
    m.add_argument("--disk-gbps", type=float, default=1.0)
    m.add_argument("--iops", type=float, default=100_000)
    m.add_argument("--out", default="results/index_scale")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.mode == "real":
        return run_one(args) if args.one else run_sweep(args) if args.sweep else run_real(args)
    if args.mode == "model":
        return run_model(args)
    if args.mode == "merge":
        return run_merge(args)
    if args.mode == "ondisk":
        return run_ondisk_one(args) if args.one else run_ondisk(args)
    return run_synthetic_one(args) if args.one else run_synthetic(args)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
