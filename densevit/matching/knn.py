"""Exact k-NN and best buddies of descriptor sets (FAISS or torch); the backends k-means shares.

Shapes: ``query`` / ``a`` is ``N x D``, ``base`` / ``b`` is ``M x D``, ``k`` neighbours.

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
from typing import Optional, Tuple, Union

import numpy as np
import torch

try:  # FAISS is optional (the GPU machine has torch but no FAISS).
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    faiss = None

from ..errors import DensevitError, InvalidArgumentError

__all__ = [
    "DEFAULT_CHUNK_SIZE", "faiss_available", "faiss_gpu_available", "resolve_backend",
    "knn", "similarity_matrix", "nearest_both_ways", "best_buddies",
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
        raise InvalidArgumentError(f"backend must be one of {_BACKENDS}, got {backend!r}")
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
        raise InvalidArgumentError(f"{name} must be 2-D (rows x dims), got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        t = t.float()
    return t.detach()


def _check_pair(query: torch.Tensor, base: torch.Tensor, metric: str) -> None:
    if metric not in _METRICS:
        raise InvalidArgumentError(f"metric must be one of {_METRICS}, got {metric!r}")
    if query.shape[1] != base.shape[1]:
        raise InvalidArgumentError(f"dimension mismatch: {query.shape[1]} vs {base.shape[1]}")
    if query.device != base.device:
        raise InvalidArgumentError(f"query on {query.device} but base on {base.device}")


def _chunk(chunk_size: Optional[int]) -> int:
    c = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if c < 1:
        raise InvalidArgumentError(f"chunk_size must be >= 1, got {chunk_size}")
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
        raise InvalidArgumentError(f"k must be in [1, {base.shape[0]}] (base rows), got {k}")
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
