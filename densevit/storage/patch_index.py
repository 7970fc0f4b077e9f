"""A corpus-scale patch index: every token of every image of a feature store, searchable by similarity.

An index is a folder::

    index.json      settings (kind, layer, facet, token selection, FAISS parameters), the store it was built
                    from (path, settings digest and content digest: each image's shard SHA-256, row and size),
                    the image keys, counts, and each file's size and SHA-256
    ids.npy         ``N x 3`` int32: (image number, token row, token column) of every indexed vector
    index.faiss     the FAISS index of the L2-normalised descriptors (inner product = cosine similarity);
                    ``flat`` without FAISS: ``vectors.npy`` (float16) searched exactly through :mod:`densevit.matching.knn`

Kinds: ``flat`` (exact), ``ivf-flat``, ``ivf-pq`` (product-quantised codes; ``max(k, rerank)`` candidates are
re-scored exactly with the store's own descriptors, read from its memory-mapped shards) and ``hnsw``. An index
opens only with the store content it was built from (:func:`load_index`); ``k`` lies in ``1..MAX_K``. Training uses a
random sample of the selected tokens; vectors are added a chunk of images at a time, so memory stays bounded
by the index itself. Search runs FAISS on a GPU when faiss-gpu is installed, and exact search through torch on
a GPU without FAISS (``flat``). Every pixel <-> token conversion goes through :class:`densevit.models.grid.TokenGrid`.

With ``on_disk`` (IVF kinds) the inverted lists live in a memory-mapped file instead, built in parts over torchrun
ranks and grown in place: :mod:`densevit.storage.index_ondisk` (the files it writes are listed there).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DensevitError
from ..io.files import verify_file
from ..matching import knn as knn_index
from ..models.grid import TokenGrid
from ..options import opt
from ..runtime.device import select_device
from ..io.files import atomic_write, file_sha256
from .store import FeatureStore

__all__ = ["IVF_KINDS", "KINDS", "MAX_K", "IndexConfig", "Match", "PatchIndex", "build_index", "check_k", "load_index",
           "check_selected", "image_record", "index_inputs", "read_meta", "training_sample", "verify_index_files",
           "query_descriptors", "rebuild_command", "search", "PatchIndexError"]

KINDS = ("flat", "ivf-flat", "ivf-pq", "hnsw")
IVF_KINDS = ("ivf-flat", "ivf-pq")
MAX_K = 2048            # matches per query at most (FAISS's limit on GPUs; the same bound on every device)
FORMAT = "densevit-patch-index-v1"
META, IDS, FAISS_FILE, VECTORS = "index.json", "ids.npy", "index.faiss", "vectors.npy"


MIN_HNSW_M, MAX_HNSW_M = 2, 512     # HNSW neighbours per node: FAISS needs 2; memory grows with M
MAX_DEFAULT_NLIST = 4096            # the default lists stop here: the flat coarse quantiser's encode cost grows with them
PROBE_SHARE, MIN_DEFAULT_NPROBE = 4, 16   # default nprobe: a PROBE_SHARE-th of the lists, at least 16 (or all)


class PatchIndexError(DensevitError):
    """An index file is missing, truncated or modified, or the index does not belong to the store."""


@dataclass
class IndexConfig:
    """What is indexed and how.

    Attributes:
        kind: one of :data:`KINDS`.
        layer, facet: the stored descriptors to index (None: the store's only one).
        sample_stride: index every ``K``-th token row and column (1: every token).
        salient_only: only tokens with CLS-attention saliency >= ``saliency_threshold`` (store with saliency).
        nlist: IVF lists (None: about ``4 * sqrt(N)``, a power of two, at most ``N / 39`` and 4096).
        pq_m: PQ sub-quantisers (None: ``D / 4``, e.g. 96 bytes a vector for 384-d), 8 bits each (fewer when
            there are too few vectors to train 256 centroids).
        hnsw_m: HNSW neighbours per node.
        train_size: vectors sampled for training (at least 39 per IVF list).
        nprobe: IVF lists visited per query (None: a quarter of the lists, at least 16 -- recall@10 >= 0.95 on
            the 100 M synthetic benchmark with ``rerank`` 1000; 16 already gives 0.955 on 1 M real DAVIS
            descriptors, at a fraction of the latency). ef_search: HNSW candidate list size.
        rerank: ivf-pq candidates re-scored exactly from the store (0: none).
        chunk_images: images added to the index at a time.
        on_disk: encode in parts (sharded over torchrun ranks) and merge them into inverted lists on disk
            (:mod:`densevit.storage.index_ondisk`); IVF kinds only.
        part_vectors: vectors per part with ``on_disk``: a rank holds one part's codes at a time.
    """

    kind: str = opt("ivf-pq", "flat: exact; ivf-pq: compact", choices=KINDS)
    layer: Optional[int] = opt(None, "stored layer (default: the store's only one)")
    facet: Optional[str] = opt(None, "stored facet (default: the store's only one)")
    sample_stride: int = opt(1, "index every K-th token row and column")
    salient_only: bool = opt(False, "only tokens with saliency >= --saliency-threshold", negatable=False)
    saliency_threshold: float = opt(0.5, "CLS-attention saliency a token needs with --salient-only")
    nlist: Optional[int] = opt(None, "IVF lists (default: about 4 sqrt(N))")
    pq_m: Optional[int] = opt(None, "PQ bytes per vector (default: D/4)")
    hnsw_m: int = opt(32, "HNSW neighbours per node")
    train_size: int = opt(200_000, "vectors sampled for training")
    nprobe: Optional[int] = opt(None, "IVF lists visited per query (default: a quarter of the lists, at least 16)")
    ef_search: int = opt(64, "HNSW candidate list size", cli=False)
    rerank: int = opt(1000, "ivf-pq candidates re-scored exactly from the store")
    chunk_images: int = opt(64, "images added to the index at a time", cli=False)
    seed: int = opt(0, "training sample seed", cli=False)
    on_disk: bool = opt(False, "inverted lists on disk, memory-mapped at search (ivf-flat, ivf-pq; implied under "
                               "torchrun); densevit-index update grows it", negatable=False)
    part_vectors: int = opt(1_000_000, "vectors encoded per part with --on-disk (bounds each rank's memory)")

    def check(self) -> None:
        if self.kind not in KINDS:
            raise DensevitError(f"unknown index kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.sample_stride < 1 or self.chunk_images < 1 or self.train_size < 1 or self.part_vectors < 1:
            raise DensevitError("--sample-stride, --part-vectors, chunk size and training size must be >= 1")
        if self.on_disk and self.kind not in IVF_KINDS:
            raise DensevitError(f"--on-disk keeps inverted lists on disk: use --kind {' or '.join(IVF_KINDS)} "
                                f"(got {self.kind})")
        if (self.nprobe is not None and self.nprobe < 1) or self.ef_search < 1 or self.rerank < 0:
            raise DensevitError(f"--nprobe must be >= 1 (got {self.nprobe}), ef_search >= 1 and --rerank >= 0 "
                                f"(got {self.rerank})")
        for flag, value in (("--nlist", self.nlist), ("--pq-m", self.pq_m)):
            if value is not None and value < 1:       # 0 is not "the default": leave the flag out for that
                raise DensevitError(f"{flag} must be >= 1, got {value} (leave it out for the default)")
        if not MIN_HNSW_M <= self.hnsw_m <= MAX_HNSW_M:
            raise DensevitError(f"--hnsw-m must be between {MIN_HNSW_M} and {MAX_HNSW_M} (FAISS keeps 2 x M "
                                f"neighbours per vector), got {self.hnsw_m}")

    def check_sizes(self, n: int, d: int) -> None:
        """The parameters against the ``n`` vectors of ``d`` dims to index, before FAISS sees them: an IVF needs
        at least one training vector per list, PQ sub-quantisers split the ``d`` dims evenly."""
        self.check()
        trained = min(n, self.train_size)
        if self.kind in ("ivf-flat", "ivf-pq") and self.nlist is not None and self.nlist > trained:
            raise DensevitError(f"--nlist {self.nlist} is more lists than the {trained:,} training vectors "
                                f"({n:,} vectors to index, --train-size {self.train_size:,}); use at most {trained:,}, "
                                f"or leave it out for the default ({_default_nlist(n)})")
        if self.kind == "ivf-pq" and self.pq_m is not None and (self.pq_m > d or d % self.pq_m):
            divisors = [m for m in range(1, d + 1) if d % m == 0]
            raise DensevitError(f"--pq-m {self.pq_m} must divide the descriptor size {d} (e.g. "
                                f"{', '.join(str(m) for m in divisors[-4:])})")

    def check_nprobe(self, nlist: Optional[int]) -> None:
        """``nprobe`` against an IVF index of ``nlist`` lists (``None``: not an IVF, nprobe unused)."""
        if nlist is not None and self.nprobe is not None and self.nprobe > nlist:
            raise DensevitError(f"--nprobe {self.nprobe} is more than the {nlist} lists of this index")

    def probes(self, nlist: int) -> int:
        """The lists an IVF index of ``nlist`` lists visits per query: ``nprobe``, or by default a
        ``PROBE_SHARE``-th of the lists, at least ``MIN_DEFAULT_NPROBE`` (all of them when there are fewer)."""
        if self.nprobe is not None:
            return int(min(self.nprobe, nlist))
        return int(min(nlist, max(MIN_DEFAULT_NPROBE, nlist // PROBE_SHARE)))


@dataclass
class Match:
    """One search result: a token of a stored image, its centre in original-image pixels and its similarity."""

    image: str
    x: float
    y: float
    row: int
    col: int
    similarity: float


def check_k(k: int) -> None:
    """Matches per query must lie in ``1..MAX_K`` (one line otherwise)."""
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise DensevitError(f"-k (matches per query) must be between 1 and {MAX_K}, got {k}")


# ------------------------------------------------------------------------------------------------ selection
def select_tokens(grid: TokenGrid, cfg: IndexConfig, saliency: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat indices of the tokens of one image that ``cfg`` indexes (every ``sample_stride``-th row and column,
    salient ones only with ``salient_only``)."""
    h, w = grid.shape
    rows = torch.arange(0, h, cfg.sample_stride)
    cols = torch.arange(0, w, cfg.sample_stride)
    idx = grid.flat(rows[:, None].expand(-1, cols.numel()), cols[None, :].expand(rows.numel(), -1)).reshape(-1)
    if cfg.salient_only:
        if saliency is None:
            raise DensevitError("--salient-only needs a store extracted with --saliency")
        idx = idx[saliency[idx] >= cfg.saliency_threshold]
    return idx


def _normalize(x: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, float32 numpy (numpy: no thread pool start-up on a per-query path)."""
    x = np.array(x.float().numpy(), dtype=np.float32, copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


def _faiss():
    if not knn_index.faiss_available():
        raise DensevitError("this index kind needs FAISS (pip install faiss-cpu); --kind flat works through torch")
    return knn_index.faiss


def _default_nlist(n: int) -> int:
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, MAX_DEFAULT_NLIST, n // 39 if n >= 39 else 1)))


def _make_faiss(cfg: IndexConfig, d: int, n: int) -> Tuple[Any, Dict[str, Any]]:
    """An untrained FAISS index of kind ``cfg.kind`` for ``n`` vectors of ``d`` dims, with its parameters."""
    faiss = _faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(d), {}
    if cfg.kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
        return idx, {"hnsw_m": cfg.hnsw_m}
    nlist = cfg.nlist or _default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if cfg.kind == "ivf-flat":
        return faiss.IndexIVFFlat(quantizer, d, nlist, ip), {"nlist": nlist}
    m = cfg.pq_m or max(1, d // 4)
    if d % m:
        raise DensevitError(f"pq_m {m} must divide the descriptor size {d}")
    bits = int(min(8, max(1, math.floor(math.log2(max(min(n, cfg.train_size) // 39, 2))))))  # 39 per centroid
    return faiss.IndexIVFPQ(quantizer, d, nlist, m, bits, ip), {"nlist": nlist, "pq_m": m, "pq_bits": bits}


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class PatchIndex:
    """A loaded patch index: the FAISS index (or exact vectors), the id map and the store it belongs to."""

    root: Path
    meta: Dict[str, Any]
    ids: np.ndarray                      # N x 3 int32 (image number, row, col)
    store: FeatureStore
    faiss_index: Any = None
    vectors: Optional[torch.Tensor] = None
    device: str = "cpu"
    _grids: Dict[int, TokenGrid] = field(default_factory=dict)
    _where: Optional[Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]] = None

    @property
    def images(self) -> List[str]:
        return self.meta["images"]

    @property
    def config(self) -> IndexConfig:
        return IndexConfig(**self.meta["config"])

    def __len__(self) -> int:
        return int(self.meta.get("count", self.ids.shape[0]))

    def memory_bytes(self) -> int:
        """Bytes the searchable index holds in memory: its serialised size (codes or vectors, inverted lists,
        graph, quantisers), which is what FAISS loads; the id map (12 bytes a vector) is not included. With the
        lists on disk: the quantiser, the PQ tables and the list directory (the codes are memory-mapped)."""
        if self.faiss_index is not None:
            return int(self.meta["files"][self.meta.get("faiss_file", FAISS_FILE)]["size"])
        return int(self.vectors.numel() * self.vectors.element_size())

    def grid(self, image_no: int) -> TokenGrid:
        g = self._grids.get(image_no)
        if g is None:
            g = self._grids[image_no] = self.store.grid(self.images[image_no])
        return g

    def search_vectors(self, queries: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``QxD`` descriptors -> ``(sims QxK, vector ids QxK)``, best first (ids -1 where fewer exist). ``ivf-pq``
        re-scores ``max(k, rerank)`` candidates exactly (``rerank`` > 0), so the ``k`` returned always carry
        exact similarities."""
        check_k(k)
        q = _normalize(queries.reshape(-1, queries.shape[-1]))
        k = int(min(k, len(self)))
        if self.faiss_index is None:
            sims, idx = knn_index.knn(torch.from_numpy(q).to(self.device), self.vectors, k=k, metric="ip")
            return sims.cpu().numpy(), idx.cpu().numpy()
        cfg = self.config
        index = self.faiss_index
        if hasattr(index, "nprobe"):
            index.nprobe = cfg.probes(index.nlist)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = max(cfg.ef_search, k)
        rerank = self.meta["kind"] == "ivf-pq" and cfg.rerank > 0
        want = int(min(max(k, cfg.rerank), len(self))) if rerank else k     # at least k candidates
        sims, idx = index.search(q, want)
        if rerank:
            sims, idx = self._rerank(q, idx, k)
        return sims, idx

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Exact cosine of each query with its candidates, read from the store's memory-mapped shards."""
        if self._where is None:                     # per image: shard number, offset, token columns
            live = [i for i, key in enumerate(self.images) if key is not None]    # (None: pruned)
            names, sno, offs = self.store.locations([self.images[i] for i in live])
            shard_no, offsets, widths = (np.zeros(len(self.images), np.int64) for _ in range(3))
            shard_no[live], offsets[live] = sno, offs
            widths[live] = [self.grid(i).shape[1] for i in live]
            self._where = (names, shard_no, offsets, widths)
        names, shard_no, offsets, widths = self._where
        flat = cand.reshape(-1)
        ok = flat >= 0
        vec = np.zeros((flat.size, q.shape[1]), np.float32)
        if ok.any():
            im, r, c = self.ids[flat[ok]].T.astype(np.int64)
            vec[ok] = _normalize(self.store.gather(names, shard_no[im], offsets[im], r * widths[im] + c,
                                                   self.meta["layer"], self.meta["facet"]))
        sims = np.einsum("qd,qcd->qc", q, vec.reshape(cand.shape[0], cand.shape[1], -1))
        sims[cand < 0] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1), np.take_along_axis(cand, order, 1)

    def matches(self, sims: np.ndarray, idx: np.ndarray) -> List[Match]:
        """One query's ``(sims K, ids K)`` as :class:`Match` es (pixel centres in the original image)."""
        out = []
        for s, i in zip(sims, idx):
            if i < 0:
                continue
            im, r, c = (int(v) for v in self.ids[i])
            g = self.grid(im)
            x, y = g.tokens_to_pixels(g.flat(torch.tensor([r]), torch.tensor([c])))[0].tolist()
            out.append(Match(self.images[im], float(x), float(y), r, c, float(s)))
        return out


# ------------------------------------------------------------------------------------------------ build
def index_inputs(st: FeatureStore, cfg: IndexConfig) -> Tuple[int, str, List[str]]:
    """The stored layer, facet and image keys an index with ``cfg`` reads, checked (one line each)."""
    layer, facet = st.select(cfg.layer, cfg.facet)
    if facet == "attn":
        raise DensevitError("facet attn holds attention maps, not descriptors; index key, query, value or token")
    if cfg.salient_only and not st.settings.get("saliency"):
        raise DensevitError("--salient-only needs a store extracted with --saliency")
    if not st.images:
        raise DensevitError(f"store {st.root} holds no images")
    return layer, facet, st.images


def check_selected(n: int) -> int:
    """``n``, the number of tokens selected for an index, when there is any."""
    if n == 0:
        raise DensevitError("no token selected (lower --saliency-threshold or --sample-stride)")
    return n


def build_index(store: Union[str, Path, FeatureStore], out: Union[str, Path], cfg: IndexConfig = IndexConfig(),
                progress: bool = True) -> PatchIndex:
    """Index every selected token of ``store`` into the folder ``out`` (see the module docstring); an index with
    its lists on disk (``cfg.on_disk``) is built by :func:`densevit.storage.index_ondisk.build_on_disk`."""
    cfg.check()
    if cfg.on_disk:
        raise DensevitError("build_index keeps the lists in memory; build an on_disk index with "
                            "densevit.storage.index_ondisk.build_on_disk")
    st = store if isinstance(store, FeatureStore) else FeatureStore(store)
    layer, facet, images = index_inputs(st, cfg)
    selected = [select_tokens(st.grid(k), cfg, st.saliency(k) if cfg.salient_only else None) for k in images]
    n = check_selected(int(sum(int(s.numel()) for s in selected)))
    d = int(st.descriptors(images[0], layer, facet).shape[1])
    cfg.check_sizes(n, d)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    params: Dict[str, Any] = {}
    use_faiss = cfg.kind != "flat" or knn_index.faiss_available()
    if use_faiss:
        index, params = _make_faiss(cfg, d, n)
        if not index.is_trained:
            index.train(training_sample(st, images, selected.__getitem__, layer, facet, cfg, n, progress))
    else:
        vectors = np.empty((n, d), np.float16)

    ids = np.empty((n, 3), np.int32)
    pos = 0
    bar = tqdm(total=n, desc="adding", unit="vec", disable=not progress, unit_scale=True)
    for start in range(0, len(images), cfg.chunk_images):
        keys = images[start:start + cfg.chunk_images]
        chunk, rows = [], []
        for j, key in enumerate(keys, start):
            sel = selected[j]
            chunk.append(_normalize(st.descriptors(key, layer, facet)[sel]))
            r, c = st.grid(key).unflat(sel)
            rows.append(np.stack([np.full(sel.numel(), j), r.numpy(), c.numpy()], 1))
        x = np.concatenate(chunk)
        if use_faiss:
            index.add(x)
        else:
            vectors[pos:pos + len(x)] = x
        ids[pos:pos + len(x)] = np.concatenate(rows)
        pos += len(x)
        bar.update(len(x))
    bar.close()

    files = {IDS: ids}
    _save_npy(out / IDS, ids)
    if use_faiss:
        faiss = _faiss()
        atomic_write(out / FAISS_FILE, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))
        files[FAISS_FILE] = None
    else:
        _save_npy(out / VECTORS, vectors)
        files[VECTORS] = None
    meta = {"format": FORMAT, "kind": cfg.kind, "config": asdict(cfg), "params": params, "layer": layer,
            "facet": facet, "dim": d, "count": n, "images": images, "store": str(st.root.resolve()),
            "store_digest": _store_digest(st), "store_content": _content_digest(st, images),
            "files": {name: {"size": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
                      for name in files}}
    atomic_write(out / META, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return load_index(out, st)


def training_sample(st: FeatureStore, images: Sequence[str], select, layer: int, facet: str, cfg: IndexConfig,
                    n: int, progress: bool) -> np.ndarray:
    """A random sample of about ``cfg.train_size`` of the ``n`` selected vectors, drawn across every image (each
    contributes in proportion; ``select(i)``: image ``i``'s selected tokens)."""
    g = torch.Generator().manual_seed(cfg.seed)
    rate = min(1.0, cfg.train_size / n)
    parts = []
    for i in tqdm(range(len(images)), desc="training sample", disable=not progress or rate >= 1):
        key, sel = images[i], select(i)
        if sel.numel() == 0:
            continue
        take = sel if rate >= 1 else sel[torch.rand(sel.numel(), generator=g) < rate]
        if take.numel():
            parts.append(_normalize(st.descriptors(key, layer, facet)[take]))
    return np.concatenate(parts)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def _store_digest(st: FeatureStore) -> str:
    """The store's settings digest (what makes two stores' descriptors comparable)."""
    meta = json.loads((st.root / "store.json").read_text())
    return str(meta.get("digest"))


def _content_digest(st: FeatureStore, images: Sequence[str]) -> str:
    """Identity of the stored descriptors an index is built from: per image (in index order) its key, the
    SHA-256 of the shard holding it, its row there and its original size. Any image replaced and re-extracted,
    or another store of the same settings, gives another digest; images the store gained do not change it."""
    shards, entries = st.manifest["shards"], st.manifest["images"]
    h = hashlib.sha256()
    for key in images:
        if key is None:                                  # pruned from an on-disk index
            continue
        e = entries[key]
        h.update(json.dumps([key, shards[e["shard"]]["sha256"], e["offset"], list(e["image_hw"])]).encode())
        h.update(b"\n")
    return h.hexdigest()


def image_record(st: FeatureStore, key: str) -> List[Any]:
    """What identifies one stored image's descriptors: its shard's SHA-256, its row there, its original size."""
    e = st.manifest["images"][key]
    return [st.manifest["shards"][e["shard"]]["sha256"], e["offset"], list(e["image_hw"])]


def rebuild_command(root: Union[str, Path], store: Union[str, Path], cfg: IndexConfig) -> str:
    """The ``densevit-index build`` command line that rebuilds index ``root`` from ``store`` with ``cfg``."""
    d, flags = IndexConfig(), []
    for name in ("kind", "layer", "facet", "sample_stride", "saliency_threshold", "nlist", "pq_m", "hnsw_m",
                 "train_size", "nprobe", "rerank"):
        value = getattr(cfg, name)
        if value != getattr(d, name) and value is not None:
            flags.append(f"--{name.replace('_', '-')} {value}")
    if cfg.salient_only:
        flags.append("--salient-only")
    if cfg.on_disk:
        flags.append("--on-disk" + (f" --part-vectors {cfg.part_vectors}" if cfg.part_vectors != d.part_vectors else ""))
    return " ".join(["densevit-index build", str(store), "-o", str(root), *flags, "--overwrite"])


def _check_content(root: Path, meta: Dict[str, Any], st: FeatureStore) -> None:
    """Refuse a store whose content is not the one the index was built from, naming the rebuild command."""
    rebuild = f"rebuild it: {rebuild_command(root, st.root, IndexConfig(**meta['config']))}"
    content = meta.get("store_content")
    if content is None:
        raise PatchIndexError(f"index {root} does not record the content of its store (an older densevit made it); "
                          f"{rebuild}")
    stored = st.manifest["images"]
    missing = next((k for k in meta["images"] if k is not None and k not in stored), None)
    if missing is not None:
        fix = (f"remove what the store pruned: densevit-index update {root} --prune" if meta.get("on_disk")
               else rebuild)
        raise PatchIndexError(f"index {root} was built from image {missing}, which store {st.root} does not hold; "
                          f"{fix}")
    if _content_digest(st, meta["images"]) != content:
        raise PatchIndexError(f"store {st.root} does not hold the descriptors index {root} was built from (an image "
                          f"was replaced or re-extracted, or it is another store); {rebuild}")


# ------------------------------------------------------------------------------------------------ load
def verify_index_files(root: Path, meta: Dict[str, Any]) -> None:
    """Every file of an index against its record (size; SHA-256, or for large files the SHA-256 of blocks spread
    over it), one line naming the first that differs."""
    from .ondisk import sample_sha256

    fix = "rebuild it with densevit-index build"
    for name, rec in meta["files"].items():
        verify_file(root / name, rec["size"], rec.get("sha256"), "index file", "the index", fix, PatchIndexError)
        if "sample_sha256" in rec and sample_sha256(root / name) != rec["sample_sha256"]:
            raise PatchIndexError(f"index file {root / name} is modified or was left half-written (its content "
                                  f"differs from the index's record); {fix}")


def read_meta(root: Path) -> Dict[str, Any]:
    """An index folder's ``index.json``, or one line saying why it is not an index."""
    meta_path = root / META
    if not meta_path.is_file():
        raise PatchIndexError(f"no patch index at {root} (missing {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise PatchIndexError(f"index file {meta_path} is corrupt (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PatchIndexError(f"{meta_path} is not a densevit patch index")
    return meta


def load_index(root: Union[str, Path], store: Union[str, Path, FeatureStore, None] = None,
               device: Optional[str] = None) -> PatchIndex:
    """Open an index folder, checking every file against its record and the store against the index's.

    ``store``: the feature store (default: the path recorded at build time). ``device``: where exact ``flat``
    search runs without FAISS (and where FAISS-GPU runs when installed); default CUDA when available."""
    root = Path(root)
    meta = read_meta(root)
    verify_index_files(root, meta)
    st = store if isinstance(store, FeatureStore) else FeatureStore(store or meta["store"])
    if _store_digest(st) != meta["store_digest"]:
        raise PatchIndexError(f"index {root} was built from a store with other settings than {st.root}; "
                          f"rebuild it from this store")
    _check_content(root, meta, st)
    dev = str(select_device(device))
    if meta.get("on_disk"):                          # lists and id map memory-mapped, read-only
        from .ondisk import open_index

        ids = np.load(root / meta["ids_file"], mmap_mode="r")
        return PatchIndex(root, meta, ids, st, faiss_index=open_index(root / meta["faiss_file"]), device=dev)
    ids = np.load(root / IDS)
    if FAISS_FILE in meta["files"]:
        faiss = _faiss()
        index = faiss.read_index(str(root / FAISS_FILE))
        if dev.startswith("cuda") and knn_index.faiss_gpu_available() and meta["kind"] != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return PatchIndex(root, meta, ids, st, faiss_index=index, device=dev)
    vectors = torch.from_numpy(np.load(root / VECTORS)).to(dev)
    vectors = vectors.float() if dev == "cpu" else vectors
    return PatchIndex(root, meta, ids, st, vectors=vectors, device=dev)


# ------------------------------------------------------------------------------------------------ queries
def query_descriptors(index: PatchIndex, image: Union[str, Path], points: Optional[Sequence[Tuple[float, float]]] = None,
                      box: Optional[Tuple[float, float, float, float]] = None, extractor=None
                      ) -> Tuple[torch.Tensor, TokenGrid, List[int]]:
    """Query descriptors ``QxD`` of ``image`` (from the store when it holds the image, by key or path, else from
    ``extractor``, a :class:`~densevit.features.source.FeatureSource` that must match the store's settings): one per point, or one for a box (the mean of the
    normalised descriptors of the tokens centred inside it). Returns the descriptors, the image's grid and the
    query tokens (flat indices; for a box, all of its tokens)."""
    from ..features.similarity import token_at

    if (points is None) == (box is None):
        raise DensevitError("give query points or a box (not both)")
    layer, facet = index.meta["layer"], index.meta["facet"]
    st = index.store
    if image in st:                                  # the store, as a FeatureSource (no pixels read)
        f = st.image_features(image, None, layer, facet, saliency=False, pixels=False)
        desc, grid = f.descriptors, f.grid
    elif extractor is not None:                      # any FeatureSource with the store's settings (the model)
        f = extractor.image_features(image, st.settings.get("load_size"), layer, facet, saliency=False)
        desc, grid = f.descriptors, f.grid
    else:
        raise DensevitError(f"image {image} is not in store {st.root}; extract it into the store, or give the "
                            f"weights to extract it with the store's settings")
    if points is not None:
        tokens = [token_at(grid, float(x), float(y)) for x, y in points]
        return desc[tokens], grid, tokens
    x0, y0, x1, y1 = (float(v) for v in box)
    H, W = grid.original_hw
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise DensevitError(f"box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) is not inside the image ({W}x{H} pixels)")
    c = grid.token_centers()
    inside = torch.nonzero((c[:, 0] >= x0) & (c[:, 0] < x1) & (c[:, 1] >= y0) & (c[:, 1] < y1)).reshape(-1)
    if inside.numel() == 0:
        inside = grid.pixels_to_tokens(torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2]]))
    q = torch.nn.functional.normalize(desc[inside].float(), dim=-1).mean(0, keepdim=True)
    return q, grid, inside.tolist()


def search(index: PatchIndex, image: Union[str, Path], points: Optional[Sequence[Tuple[float, float]]] = None,
           box: Optional[Tuple[float, float, float, float]] = None, k: int = 20, extractor=None
           ) -> List[List[Match]]:
    """The ``k`` best-matching locations across the collection for each query point (or the box): one list
    of :class:`Match` per query, most similar first."""
    check_k(k)
    q, _, _ = query_descriptors(index, image, points, box, extractor)
    sims, idx = index.search_vectors(q, k)
    return [index.matches(s, i) for s, i in zip(sims, idx)]
