"""The one descriptor index: exact k-NN, best buddies, label transfer and k-means.

Shapes: ``query`` / ``a`` is ``N x D``, ``base`` / ``b`` is ``M x D``, ``k`` neighbours, ``C`` label channels.

Everything is exact (brute force) and computed in float32, whatever the input dtype. Backends:

* ``"faiss"``: FAISS ``IndexFlatIP`` (``faiss-cpu``); a ``GpuIndexFlatIP`` when the installed FAISS has GPU
  support and the inputs are on a GPU (data then goes through host memory).
* ``"torch"``: blocked matmul + ``topk``, on the inputs' device; works without FAISS installed.
* ``"auto"``: FAISS on the CPU when installed; on a GPU, FAISS-GPU when available else torch; torch when
  FAISS is missing.

FAISS is optional: this module imports without it. Memory is bounded by ``chunk_size``: similarities are only
ever materialised in ``chunk_size x chunk_size`` blocks (the torch path) and queries go to FAISS in chunks of
``chunk_size`` rows, so matching two 12k-token images never builds the full 12k x 12k matrix.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch

try:  # FAISS is optional (the GPU machine has torch but no FAISS).
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    faiss = None

from .errors import DensevitError

__all__ = [
    "DEFAULT_CHUNK_SIZE", "faiss_available", "faiss_gpu_available", "resolve_backend",
    "knn", "similarity_matrix", "nearest_both_ways", "best_buddies", "label_transfer", "kmeans", "elbow_kmeans",
]

TensorLike = Union[torch.Tensor, np.ndarray]

DEFAULT_CHUNK_SIZE = 4096
"""Rows per block: a similarity block holds at most ``chunk_size**2`` float32 values (64 MiB at 4096)."""

_EPS = 1e-12  # as torch.nn.functional.normalize: zero vectors get cosine 0 with everything
_METRICS = ("cosine", "ip")
_BACKENDS = ("auto", "faiss", "torch")
_gpu_resources = None


# --------------------------------------------------------------------------------------------------- backends
def faiss_available() -> bool:
    """True when FAISS can be imported."""
    return faiss is not None


def faiss_gpu_available() -> bool:
    """True when the installed FAISS was built with GPU support and sees at least one GPU."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover - broken GPU builds
        return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto" | "faiss" | "torch"`` and the data's device to ``"faiss-cpu" | "faiss-gpu" | "torch"``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    on_gpu = device.type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "faiss":
        if faiss is None:
            raise DensevitError("backend 'faiss' requested but faiss is not installed "
                                "(pip install faiss-cpu, or use backend 'torch')")
        return "faiss-gpu" if on_gpu and faiss_gpu_available() else "faiss-cpu"
    if on_gpu:
        return "faiss-gpu" if faiss_gpu_available() else "torch"
    return "faiss-cpu" if faiss is not None else "torch"


def _gpu_res():
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


# ---------------------------------------------------------------------------------------------------- helpers
def _as_2d(x: TensorLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x dims), got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        t = t.float()
    return t.detach()


def _check_pair(query: torch.Tensor, base: torch.Tensor, metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if query.shape[1] != base.shape[1]:
        raise ValueError(f"dimension mismatch: {query.shape[1]} vs {base.shape[1]}")
    if query.device != base.device:
        raise ValueError(f"query on {query.device} but base on {base.device}")


def _chunk(chunk_size: Optional[int]) -> int:
    c = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return c


def _inv_norms(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``1 / max(||x_i||, eps)`` as float32, computed in row chunks (no full float32 copy of ``x``)."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.linalg.vector_norm(x[s:s + chunk].float(), dim=1)
    return out.clamp_min_(_EPS).reciprocal_()


def _to_numpy_f32(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 host array that never aliases ``x`` (safe to modify in place)."""
    return x.to("cpu", torch.float32, copy=True).contiguous().numpy()


# -------------------------------------------------------------------------------------------------------- knn
def _knn_faiss(query: torch.Tensor, base: torch.Tensor, k: int, cosine: bool, chunk: int,
               gpu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    d = base.shape[1]
    if gpu:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = query.device.index or 0
        index = faiss.GpuIndexFlatIP(_gpu_res(), d, cfg)
    else:
        index = faiss.IndexFlatIP(d)
    for s in range(0, base.shape[0], chunk):  # the index holds the only (normalised) copy of the base
        xb = _to_numpy_f32(base[s:s + chunk])
        if cosine:
            faiss.normalize_L2(xb)
        index.add(xb)
    sims = np.empty((query.shape[0], k), dtype=np.float32)
    idx = np.empty((query.shape[0], k), dtype=np.int64)
    for s in range(0, query.shape[0], chunk):
        xq = _to_numpy_f32(query[s:s + chunk])
        if cosine:
            faiss.normalize_L2(xq)
        sims[s:s + chunk], idx[s:s + chunk] = index.search(xq, k)
    return torch.from_numpy(sims).to(query.device), torch.from_numpy(idx).to(query.device)


def _knn_torch(query: torch.Tensor, base: torch.Tensor, k: int, cosine: bool,
               chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n, m = query.shape[0], base.shape[0]
    inv_q = _inv_norms(query, chunk) if cosine else None
    inv_b = _inv_norms(base, chunk) if cosine else None
    sims = torch.empty((n, k), dtype=torch.float32, device=query.device)
    idx = torch.empty((n, k), dtype=torch.long, device=query.device)
    for i in range(0, n, chunk):
        q = query[i:i + chunk].float()
        best_v = best_i = None
        for j in range(0, m, chunk):
            s = q @ base[j:j + chunk].float().T  # (<=chunk) x (<=chunk) block
            if cosine:
                s.mul_(inv_q[i:i + chunk, None]).mul_(inv_b[None, j:j + chunk])
            v, ix = s.topk(min(k, s.shape[1]), dim=1)
            ix += j
            if best_v is None:
                best_v, best_i = v, ix
            else:  # merge running top-k with this block's top-k
                v, pos = torch.cat([best_v, v], 1).topk(k, dim=1)
                best_i = torch.cat([best_i, ix], 1).gather(1, pos)
                best_v = v
        sims[i:i + chunk], idx[i:i + chunk] = best_v, best_i
    return sims, idx


@torch.no_grad()
def knn(query: TensorLike, base: TensorLike, k: int = 1, metric: str = "cosine", backend: str = "auto",
        chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query row among the base rows.

    query: NxD, base: MxD (same device). metric ``"cosine"`` (rows L2-normalised) or ``"ip"`` (inner product).
    Returns ``(sims NxK float32, idx NxK int64)`` on the query's device, most similar first.
    """
    query, base = _as_2d(query, "query"), _as_2d(base, "base")
    _check_pair(query, base, metric)
    if not 1 <= k <= base.shape[0]:
        raise ValueError(f"k must be in [1, {base.shape[0]}] (base rows), got {k}")
    chunk = _chunk(chunk_size)
    kind = resolve_backend(backend, query.device)
    if query.shape[0] == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=query.device),
                torch.empty((0, k), dtype=torch.long, device=query.device))
    if kind == "torch":
        return _knn_torch(query, base, k, metric == "cosine", chunk)
    return _knn_faiss(query, base, k, metric == "cosine", chunk, gpu=kind == "faiss-gpu")


@torch.no_grad()
def similarity_matrix(a: TensorLike, b: Optional[TensorLike] = None, metric: str = "cosine",
                      chunk_size: Optional[int] = None) -> torch.Tensor:
    """All pairwise similarities ``NxM`` float32 between the rows of ``a`` (NxD) and ``b`` (MxD, default ``a``):
    the dense graph of graph-based methods (TokenCut, LOST). ``"cosine"``: rows L2-normalised first (zero rows
    give 0, as ``F.normalize``); ``"ip"``: raw inner products. Computed on ``a``'s device in blocks of
    ``chunk_size`` rows (the result itself is dense: only ask for it where the method needs every pair)."""
    a = _as_2d(a, "a")
    b = a if b is None else _as_2d(b, "b")
    _check_pair(a, b, metric)
    chunk = _chunk(chunk_size)
    bf = b.float()
    if metric == "cosine":
        bf = torch.nn.functional.normalize(bf, dim=1)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], chunk):
        q = a[s:s + chunk].float()
        if metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        torch.matmul(q, bf.T, out=out[s:s + chunk])
    return out


# ----------------------------------------------------------------------------------------------- best buddies
def _nn_both_ways_torch(a: torch.Tensor, b: torch.Tensor, cosine: bool,
                        chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbour of every a-row in b and of every b-row in a, from ONE blocked pass over ``a @ b.T``."""
    n, m = a.shape[0], b.shape[0]
    dev = a.device
    inv_a = _inv_norms(a, chunk) if cosine else None
    inv_b = _inv_norms(b, chunk) if cosine else None
    nn_ab = torch.empty(n, dtype=torch.long, device=dev)
    col_v = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
    col_i = torch.zeros(m, dtype=torch.long, device=dev)
    for i in range(0, n, chunk):
        q = a[i:i + chunk].float()
        row_v = torch.full((q.shape[0],), -math.inf, dtype=torch.float32, device=dev)
        row_i = torch.zeros(q.shape[0], dtype=torch.long, device=dev)
        for j in range(0, m, chunk):
            s = q @ b[j:j + chunk].float().T
            if cosine:
                s.mul_(inv_a[i:i + chunk, None]).mul_(inv_b[None, j:j + chunk])
            v, ix = s.max(dim=1)
            better = v > row_v  # strict: ties keep the lowest index
            row_v = torch.where(better, v, row_v)
            row_i = torch.where(better, ix + j, row_i)
            v, ix = s.max(dim=0)
            better = v > col_v[j:j + chunk]
            col_v[j:j + chunk] = torch.where(better, v, col_v[j:j + chunk])
            col_i[j:j + chunk] = torch.where(better, ix + i, col_i[j:j + chunk])
        nn_ab[i:i + chunk] = row_i
    return nn_ab, col_i


@torch.no_grad()
def nearest_both_ways(a: TensorLike, b: TensorLike, metric: str = "cosine", backend: str = "auto",
                      chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The nearest neighbour of every row of a (NxD) among the rows of b (MxD) and of every b-row among a:
    ``(nn_ab N int64, nn_ba M int64)`` (ties: the lowest index). ``"auto"``/``"torch"`` find both in a single
    blocked pass over ``a @ b.T``; ``"faiss"`` runs two 1-NN FAISS searches."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    _check_pair(a, b, metric)
    chunk = _chunk(chunk_size)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return (torch.zeros(a.shape[0], dtype=torch.long, device=a.device),
                torch.zeros(b.shape[0], dtype=torch.long, device=a.device))
    if resolve_backend(backend, a.device) == "torch" or backend == "auto":  # also validates the name
        return _nn_both_ways_torch(a, b, metric == "cosine", chunk)
    return knn(a, b, 1, metric, backend, chunk)[1][:, 0], knn(b, a, 1, metric, backend, chunk)[1][:, 0]


@torch.no_grad()
def best_buddies(a: TensorLike, b: TensorLike, metric: str = "cosine", backend: str = "auto",
                 chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best buddies (mutual nearest neighbours, Amir et al. 2021) between the rows of a (NxD) and b (MxD).

    Pair ``(i, j)`` is kept when ``j`` is the nearest neighbour of ``a[i]`` in ``b`` and ``i`` the nearest
    neighbour of ``b[j]`` in ``a`` (:func:`nearest_both_ways`). Returns ``(idx_a, idx_b)``, int64 of length K,
    sorted by ``idx_a``. To restrict to foreground tokens, filter the pairs afterwards
    (``keep = fg_a[idx_a] & fg_b[idx_b]``).
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    nn_ab, nn_ba = nearest_both_ways(a, b, metric, backend, chunk_size)
    if a.shape[0] == 0 or b.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.long, device=a.device)
        return empty, empty.clone()
    idx_a = torch.nonzero(nn_ba[nn_ab] == torch.arange(a.shape[0], device=a.device)).flatten()
    return idx_a, nn_ab[idx_a]


# --------------------------------------------------------------------------------------------- label transfer
@torch.no_grad()
def label_transfer(query: TensorLike, base: TensorLike, base_labels: TensorLike, k: int = 5,
                   temperature: float = 0.1, metric: str = "cosine", backend: str = "auto",
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Soft labels for query rows (NxD) from their k nearest base rows (MxD) with labels ``base_labels`` (MxC).

    With ``s_1..s_k`` the similarities of the top-k neighbours, the weights are
    ``w_i = exp(s_i / T) / sum_j exp(s_j / T)`` (a softmax over the top-k only), and the result is
    ``sum_i w_i * base_labels[nn_i]``: NxC float32 on the query's device (rows sum to 1 for one-hot /
    probability labels). ``k`` is clipped to M.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = torch.as_tensor(base_labels)
    base_t = _as_2d(base, "base")
    if labels.ndim != 2 or labels.shape[0] != base_t.shape[0]:
        raise ValueError(f"base_labels must be {base_t.shape[0]}xC, got shape {tuple(labels.shape)}")
    sims, idx = knn(query, base_t, min(k, base_t.shape[0]), metric, backend, chunk_size)
    labels = labels.to(idx.device, torch.float32)
    weights = torch.softmax(sims / temperature, dim=1)  # = exp(s/T) normalised over the top-k (stable)
    out = torch.empty((idx.shape[0], labels.shape[1]), dtype=torch.float32, device=idx.device)
    chunk = _chunk(chunk_size)
    for s in range(0, idx.shape[0], chunk):  # bounds the NxKxC gather
        out[s:s + chunk] = torch.einsum("nk,nkc->nc", weights[s:s + chunk], labels[idx[s:s + chunk]])
    return out


# ----------------------------------------------------------------------------------------------------- kmeans
def _sq_dists_argmin(x: torch.Tensor, c: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x (NxD) among c (kxD): ``(labels N int64, squared dists N float32)``."""
    c2 = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    d2 = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk].float()
        lab = ((xs * xs).sum(1, keepdim=True) - 2 * xs @ c.T + c2[None]).argmin(dim=1)
        r = xs - c[lab]  # exact residual: the expansion above loses precision far from the origin
        labels[s:s + chunk], d2[s:s + chunk] = lab, (r * r).sum(1)
    return labels, d2


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling), deterministic given ``gen``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    cents = [x[first].float()]
    dmin = _sq_dists_argmin(x, cents[0][None], chunk)[1]
    for _ in range(1, k):  # loop over centroids, not points
        total = float(dmin.sum())
        if total > 0:
            nxt = int(torch.multinomial((dmin / total).cpu().double(), 1, generator=gen))
        else:  # all points coincide with chosen centroids
            nxt = int(torch.randint(n, (1,), generator=gen))
        cents.append(x[nxt].float())
        dmin = torch.minimum(dmin, _sq_dists_argmin(x, cents[-1][None], chunk)[1])
    return torch.stack(cents)


def _kmeans_torch(train: torch.Tensor, k: int, n_iter: int, n_redo: int, seed: int, chunk: int) -> torch.Tensor:
    """Lloyd's algorithm from k-means++ seeds, best of ``n_redo`` runs (lowest training inertia)."""
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    best_c, best_obj = None, math.inf
    for _ in range(max(1, n_redo)):
        c = _kmeanspp(train, k, gen, chunk)
        prev = None
        for _ in range(max(1, n_iter)):
            labels, d2 = _sq_dists_argmin(train, c, chunk)
            if prev is not None and torch.equal(labels, prev):
                break
            prev = labels
            sums = torch.zeros_like(c).index_add_(0, labels, train.float())
            counts = torch.bincount(labels, minlength=k)
            empty = counts == 0
            c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None].float())
            if bool(empty.any()):  # re-seed empty clusters on the worst-fitted points
                far = d2.topk(int(empty.sum())).indices
                c[empty] = train[far].float()
        obj = float(_sq_dists_argmin(train, c, chunk)[1].double().sum())
        if obj < best_obj:
            best_c, best_obj = c, obj
    return best_c


FAISS_KMEANS_SEED = 1234
"""FAISS's default k-means seed (``faiss.Kmeans`` without ``seed``): what the reference co-segmentation uses."""
FAISS_MAX_POINTS_PER_CENTROID = 256
"""FAISS's default training cap: at most ``256 * k`` training rows, a random subsample beyond that."""


def _subsample(fit: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return fit[torch.randperm(fit.shape[0], generator=gen)[:n].to(fit.device)]


@torch.no_grad()
def kmeans(x: TensorLike, k: int, n_iter: int = 300, n_redo: int = 10, seed: int = FAISS_KMEANS_SEED,
           backend: str = "auto", max_train_points: Optional[int] = None, train: Optional[TensorLike] = None,
           chunk_size: Optional[int] = None,
           max_points_per_centroid: Optional[int] = FAISS_MAX_POINTS_PER_CENTROID
           ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Euclidean k-means of x (NxD): ``(labels N int64, centroids kxD float32, inertia float)``.

    Centroids are fitted on ``train`` (TxD; default x), randomly subsampled to ``max_train_points`` rows if
    given (deterministic with ``seed``); then every row of x is assigned to its nearest centroid and
    ``inertia`` is the sum of squared distances over x.

    FAISS backend: ``faiss.Kmeans(niter=n_iter, nredo=n_redo, seed=seed,
    max_points_per_centroid=max_points_per_centroid)`` trained on the rows, and the assignment is a search of
    its centroid index (``km.index.search(x, 1)``), as the reference co-segmentation does. The defaults (300
    iterations, 10 restarts, FAISS's own seed 1234 and training cap of 256 rows per centroid: FAISS draws a
    random ``256 * k`` of more rows) are exactly the reference's ``faiss.Kmeans(d, k, niter=300, nredo=10)``;
    ``max_points_per_centroid=None`` trains on every given row. (``min_points_per_centroid`` is 1 only to
    silence FAISS's "please provide at least 39*k points" warning; it changes no result.)
    torch backend (no FAISS, or GPU data): k-means++ seeding + Lloyd, best of ``n_redo``, on the same training
    rows (capped likewise by a seeded random subsample); deterministic for a fixed seed, but not FAISS's draws.
    """
    x = _as_2d(x, "x")
    fit = x if train is None else _as_2d(train, "train").to(x.device)
    if fit.shape[1] != x.shape[1]:
        raise ValueError(f"train has {fit.shape[1]} dims but x has {x.shape[1]}")
    if max_train_points is not None and fit.shape[0] > max_train_points:
        fit = _subsample(fit, max_train_points, seed)
    if not 1 <= k <= fit.shape[0]:
        raise ValueError(f"k must be in [1, {fit.shape[0]}] (training points), got {k}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
    chunk = _chunk(chunk_size)
    kind = resolve_backend(backend, x.device)
    cap = fit.shape[0] // k + 1 if max_points_per_centroid is None else int(max_points_per_centroid)
    if kind == "torch":
        if fit.shape[0] > k * cap:
            fit = _subsample(fit, k * cap, seed)
        cents = _kmeans_torch(fit, k, n_iter, n_redo, seed, chunk)
        labels, d2 = _sq_dists_argmin(x, cents, chunk)
        return labels, cents, float(d2.double().sum())
    fit_np = _to_numpy_f32(fit)
    km = faiss.Kmeans(fit_np.shape[1], k, niter=n_iter, nredo=n_redo, seed=seed, verbose=False,
                      gpu=kind == "faiss-gpu", min_points_per_centroid=1, max_points_per_centroid=cap)
    km.train(fit_np)
    cents = torch.from_numpy(np.array(km.centroids, dtype=np.float32)).to(x.device)
    # the centroid index's own search over all rows at once (FAISS picks its distance kernel by the query count)
    d2, idx = km.index.search(_to_numpy_f32(x), 1)
    return torch.from_numpy(idx[:, 0].copy()).to(x.device), cents, float(d2.sum(dtype=np.float64))


@torch.no_grad()
def elbow_kmeans(x: TensorLike, k_range: Iterable[int] = range(1, 15), elbow: float = 0.975,
                 seed: int = FAISS_KMEANS_SEED, n_iter: int = 300, n_redo: int = 10,
                 train: Optional[TensorLike] = None, select: str = "stop", backend: str = "auto",
                 max_train_points: Optional[int] = None, chunk_size: Optional[int] = None,
                 max_points_per_centroid: Optional[int] = FAISS_MAX_POINTS_PER_CENTROID
                 ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """k-means on x (NxD) with k picked by the elbow rule of the reference co-segmentation (Amir et al.).

    For k in ``k_range`` (increasing; reference: 1..14) fit :func:`kmeans` (on ``train``, e.g. every 100th
    descriptor, as the reference; FAISS's arguments as :func:`kmeans`) and compute the mean squared distance
    ``msd_k = inertia / N`` over all of x.
    Stop at the first k with ``msd_k > elbow * msd_prev``. ``select="stop"`` returns that stopping k's
    clustering, exactly as the reference does; ``select="previous"`` returns the last k that passed the test
    instead. Without a stop the last k is returned. The reference L2-normalises descriptors first (do it
    before calling). Returns ``(labels N int64, centroids kxD, k)``.
    """
    if select not in ("stop", "previous"):
        raise ValueError(f"select must be 'stop' or 'previous', got {select!r}")
    x = _as_2d(x, "x")
    n_fit = x.shape[0] if train is None else torch.as_tensor(train).shape[0]
    if max_train_points is not None:
        n_fit = min(n_fit, max_train_points)
    prev = None  # (labels, centroids, k, msd) of the last accepted k
    for k in k_range:
        if k > n_fit:
            break
        labels, cents, inertia = kmeans(x, k, n_iter=n_iter, n_redo=n_redo, seed=seed, backend=backend,
                                        max_train_points=max_train_points, train=train, chunk_size=chunk_size,
                                        max_points_per_centroid=max_points_per_centroid)
        msd = inertia / max(1, x.shape[0])
        if prev is not None and msd > elbow * prev[3]:
            return (labels, cents, k) if select == "stop" else prev[:3]
        prev = (labels, cents, k, msd)
    if prev is None:
        raise ValueError("elbow_kmeans: k_range is empty or every k exceeds the number of training points")
    return prev[:3]
