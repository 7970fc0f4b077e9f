"""k-means of descriptors (FAISS ``Kmeans``, or k-means++ and Lloyd in torch) and the reference's elbow rule.

Shapes: ``x`` is ``N x D``; labels ``N`` int64, centroids ``k x D`` float32. Backends as :mod:`.knn`.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

from ..errors import InvalidArgumentError
from . import knn as _knn
from .knn import TensorLike, _as_2d, _chunk, _to_numpy_f32, resolve_backend

__all__ = ["kmeans", "elbow_kmeans"]

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
        raise InvalidArgumentError(f"train has {fit.shape[1]} dims but x has {x.shape[1]}")
    if max_train_points is not None and fit.shape[0] > max_train_points:
        fit = _subsample(fit, max_train_points, seed)
    if not 1 <= k <= fit.shape[0]:
        raise InvalidArgumentError(f"k must be in [1, {fit.shape[0]}] (training points), got {k}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise InvalidArgumentError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
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
    km = _knn.faiss.Kmeans(fit_np.shape[1], k, niter=n_iter, nredo=n_redo, seed=seed, verbose=False,
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
        raise InvalidArgumentError(f"select must be 'stop' or 'previous', got {select!r}")
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
        raise InvalidArgumentError("elbow_kmeans: k_range is empty or every k exceeds the number of training points")
    return prev[:3]
