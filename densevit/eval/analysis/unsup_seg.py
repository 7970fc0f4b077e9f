"""Fully unsupervised semantic segmentation of a dataset (Ziegler & Asano, *Self-supervised learning of object parts
for semantic segmentation* -- Leopart, CVPR 2022, its fully-unsupervised evaluation), on any backbone's features.

Steps, each as the reference computes it (``experiments/fully_unsup_seg`` of the official code):

1. :func:`normalize_and_pca`: standardise the patch features of the whole dataset (per channel), PCA to
   ``pca_dim`` (FAISS ``PCAMatrix``).
2. :func:`kmeans_labels`: over-cluster them (FAISS k-means, 100 iterations, 5 restarts, seeded; spherical for the
   foreground extraction step).
3. :func:`attention_masks`: a noisy foreground mask per image from the CLS attention (mean over heads, Gaussian blur
   ``sigma = 0.6`` with a 7-tap kernel, keep 65 % of the mass, drop components of at most 2 cells).
4. Cluster-based foreground extraction: :func:`cluster_precisions` (each cluster's mean precision against the
   attention masks over the images it occurs in) and :func:`foreground_clusters` (clusters whose precision reaches a
   threshold; the reference picks the threshold on ground truth, :func:`threshold_from_gt`).
5. The foreground features (nearest-upsampled to ``eval_size``) are clustered again into ``k_community`` clusters;
   background is label ``k_community``.
6. :func:`cooccurrence_matrix`: per image, counts of cluster pairs at distance 1 and 2 in 8 directions (scikit-image's
   ``graycomatrix`` offsets), diagonal zeroed, rows normalised; summed over images and divided by the number of
   images each cluster occurs in. :func:`cooccurrence_edges`: an undirected edge ``min(A[i, j], A[j, i])`` where both
   reach ``weight_threshold``.
7. :func:`merge_communities`: community detection on that graph, by default as the reference runs it: Infomap
   (the ``infomap`` package; undirected, two-level, ``markov_time``, 20 preferred modules, ``seed``), each cluster
   labelled with its Infomap module id (from 1), clusters without an edge 0. The reference runs seeds ``0..9`` and
   reports the mean; Infomap >= 2.16 refuses seed 0, so densevit's default is seed 1 (the reference's second run).
   ``method="louvain"`` (a densevit option): networkx's Louvain (``resolution``, ``seed``), communities numbered from
   1 by their smallest cluster -- a different algorithm, which merges more at ``resolution=1``.
8. :func:`hungarian_miou`: predictions matched one-to-one to ground-truth classes by the Hungarian algorithm on IoU,
   unmatched predictions counted as background (label 0), mIoU over the ground-truth classes; label 255 ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DensevitError

__all__ = ["normalize_and_pca", "kmeans_labels", "attention_masks", "cluster_precisions", "foreground_clusters",
           "threshold_from_gt", "cooccurrence_matrix", "cooccurrence_edges", "merge_communities", "MERGE_METHODS",
           "hungarian_miou", "UnsupSegResult", "unsupervised_segmentation", "IGNORE"]

IGNORE = 255
ANGLES = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi, 4 * np.pi / 3, 3 * np.pi / 2, 7 * np.pi / 4)


def normalize_and_pca(feats: np.ndarray, pca_dim: int) -> np.ndarray:
    """``N x D`` features -> ``N x pca_dim``: per-channel standardisation, then FAISS PCA."""
    import faiss
    from sklearn.preprocessing import StandardScaler

    x = np.ascontiguousarray(StandardScaler().fit_transform(np.asarray(feats, dtype=np.float32)), dtype=np.float32)
    if not 1 <= pca_dim <= x.shape[1]:
        raise DensevitError(f"pca_dim must be in 1..{x.shape[1]}, got {pca_dim}")
    pca = faiss.PCAMatrix(x.shape[1], pca_dim)
    pca.train(x)
    return pca.apply_py(x)


def kmeans_labels(x: np.ndarray, k: int, seed: int, spherical: bool = False, niter: int = 100,
                  nredo: int = 5) -> np.ndarray:
    """FAISS k-means of ``N x d`` points into ``k`` clusters; ``N`` labels."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise DensevitError(f"cannot make {k} clusters of {len(x)} features")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, verbose=False, gpu=False, spherical=spherical,
                      seed=seed)
    km.train(x)
    _, lab = km.index.search(x, 1)
    return lab[:, 0].astype(np.int64)


def _gaussian_blur(x: torch.Tensor, sigma: float, size: int = 7) -> torch.Tensor:
    """torchvision's ``GaussianBlur(size, sigma)`` of ``N x 1 x h x w`` (reflect padding)."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    pad = size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, size))
    return F.conv2d(y, k.view(1, 1, size, 1))


def attention_masks(attn: torch.Tensor, keep: float = 0.65, sigma: float = 0.6) -> torch.Tensor:
    """Noisy foreground masks ``N x h x w`` (0/1 float) of CLS attention maps ``N x h x w`` (module doc, step 3)."""
    from scipy.ndimage import label

    N, h, w = attn.shape
    a = _gaussian_blur(attn.float()[:, None], sigma).reshape(N, h * w)
    val, idx = torch.sort(a, dim=-1)
    val = val / val.sum(-1, keepdim=True)
    th = torch.cumsum(val, -1) > (1 - keep)
    th = torch.gather(th, 1, torch.argsort(idx, dim=-1)).reshape(N, h, w).float()
    for j in range(N):
        lab, n = label(th[j].numpy(), structure=np.ones((3, 3)))   # 8-connected: the reference labels a 1 x h x w
                                                                   # volume (skimage: full connectivity)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        small = np.nonzero(sizes <= 2)[0]
        small = small[small > 0]
        if small.size:
            th[j][torch.from_numpy(np.isin(lab, small))] = 0
    return th


def cluster_precisions(clusters: np.ndarray, masks: np.ndarray, k: int) -> np.ndarray:
    """``k`` precisions: per cluster, the share of its cells inside the (noisy) foreground mask, averaged over the
    images it occurs in. ``clusters`` and ``masks`` are ``N x h x w``."""
    clusters = np.asarray(clusters).reshape(len(clusters), -1).astype(np.int64)
    fg = np.asarray(masks).reshape(len(masks), -1) == 1
    N = len(clusters)
    offs = (np.arange(N)[:, None] * k + clusters).ravel()
    total = np.bincount(offs, minlength=N * k).reshape(N, k)
    tp = np.bincount(offs, weights=fg.ravel().astype(np.float64), minlength=N * k).reshape(N, k)
    present = total > 0
    if not present.any(0).all():
        missing = int(np.nonzero(~present.any(0))[0][0])
        raise DensevitError(f"cluster {missing} occurs in no image")
    prec = np.where(present, tp / np.maximum(total, 1e-8), 0.0)
    return prec.sum(0) / present.sum(0)


def _jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """The reference's ``eval_jac`` (``with_boundary``): mean over images of IoU of ``gt != 0`` and ``pred``."""
    g = (gt != 0).reshape(len(gt), -1)
    p = pred.reshape(len(pred), -1).astype(bool)
    return float(np.mean((g & p).sum(1) / np.maximum((g | p).sum(1), 1)))


def threshold_from_gt(clusters: np.ndarray, gt: np.ndarray, precs: np.ndarray) -> float:
    """The reference's threshold search: cut the clusters sorted by precision between 55 % and 75 % background,
    keep the cut with the best foreground IoU on ``gt``, round its precision to the nearest multiple of 0.05."""
    k = len(precs)
    order, sp = np.argsort(precs), np.sort(precs)
    best = None
    for start in range(int(0.55 * k), int(0.75 * k)):
        jac = _jaccard(gt, np.isin(clusters, order[start:]))
        if best is None or jac >= best[1]:      # sorted() in the reference is stable: the last best cut wins
            best = (sp[start], jac)
    if best is None:
        raise DensevitError(f"too few clusters ({k}) to search a foreground threshold")
    grid = np.arange(0, 1, 0.05)
    return float(min(grid, key=lambda t: abs(t - best[0])))


def foreground_clusters(precs: np.ndarray, threshold: float) -> np.ndarray:
    """Ids of the clusters whose precision reaches ``threshold`` (at least the most precise one)."""
    sp = np.sort(precs)
    above = np.nonzero(sp >= threshold)[0]
    start = int(above[0]) if above.size else len(sp) - 1
    return np.argsort(precs)[start:]


def _glcm_offsets(distances: Sequence[int]) -> List[Tuple[int, int]]:
    return [(int(round(math.sin(a) * d)), int(round(math.cos(a) * d))) for d in distances for a in ANGLES]


def cooccurrence_matrix(clusters: np.ndarray, num_clusters: int, distances: Sequence[int] = (1, 2)) -> np.ndarray:
    """Row-stochastic ``C x C`` co-occurrence of cluster maps ``N x h x w`` (module doc, step 6)."""
    clusters = np.asarray(clusters).astype(np.int64)
    if clusters.min() < 0 or clusters.max() >= num_clusters:
        raise DensevitError(f"cluster labels must lie in 0..{num_clusters - 1}")
    C = num_clusters
    total = np.zeros((C, C))
    appear = np.zeros(C)
    offsets = _glcm_offsets(distances)
    for img in clusters:
        h, w = img.shape
        counts = np.zeros(C * C, dtype=np.int64)
        for dr, dc in offsets:
            r0, r1 = max(0, -dr), min(h, h - dr)
            c0, c1 = max(0, -dc), min(w, w - dc)
            if r1 <= r0 or c1 <= c0:
                continue
            a = img[r0:r1, c0:c1]
            b = img[r0 + dr:r1 + dr, c0 + dc:c1 + dc]
            counts += np.bincount((a * C + b).ravel(), minlength=C * C)
        counts = counts.reshape(C, C).astype(np.float64)
        np.fill_diagonal(counts, 0)
        rs = counts.sum(1)
        total += np.divide(counts, rs[:, None], out=np.zeros_like(counts), where=rs[:, None] != 0)
        appear += rs > 0
    # a cluster in no image: 0 (the reference divides by zero, NaN, which adds no edge either)
    return np.divide(total, appear[:, None], out=np.zeros_like(total), where=appear[:, None] > 0)


def cooccurrence_edges(adj: np.ndarray, weight_threshold: float) -> List[Tuple[int, int, float]]:
    """Undirected edges ``(i, j, min(A[i, j], A[j, i]))``, ``i <= j``, where both entries reach the threshold."""
    a = np.asarray(adj)
    ok = (a >= weight_threshold) & (a.T >= weight_threshold)
    ii, jj = np.nonzero(np.triu(ok))
    return [(int(i), int(j), float(min(a[i, j], a[j, i]))) for i, j in zip(ii, jj)]


MERGE_METHODS = ("infomap", "louvain")


def merge_communities(edges: Sequence[Tuple[int, int, float]], num_clusters: int, *, method: str = "infomap",
                      markov_time: float = 1.0, seed: int = 1, resolution: float = 1.0,
                      preferred_modules: int = 20) -> np.ndarray:
    """``num_clusters`` community labels (module doc, step 7): 0 for clusters without an edge, 1.. the communities.

    ``method="infomap"`` (the reference's): Infomap module ids with ``markov_time``, ``seed`` (>= 1) and
    ``preferred_modules``; ``method="louvain"``: networkx's Louvain with ``resolution`` and ``seed``, communities
    numbered by their smallest cluster id."""
    out = np.zeros(num_clusters, dtype=np.int64)
    if method == "infomap":
        import infomap

        links = [(int(i), int(j), float(w)) for i, j, w in edges]
        if not links:
            return out
        opts = infomap.Options(directed=False, two_level=True, seed=int(seed), markov_time=float(markov_time),
                               silent=True, preferred_number_of_modules=int(preferred_modules))
        for node, module in infomap.run(links, options=opts).modules().items():
            out[int(node)] = int(module)
        return out
    if method != "louvain":
        raise ValueError(f"merge method {method!r}: use one of {', '.join(MERGE_METHODS)}")
    import networkx as nx

    g = nx.Graph()
    g.add_weighted_edges_from((i, j, w) for i, j, w in edges if i != j)
    if g.number_of_nodes() == 0:
        return out
    comms = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    for n, c in enumerate(sorted(comms, key=min), start=1):
        out[sorted(c)] = n
    return out


def hungarian_miou(gt: np.ndarray, pred: np.ndarray, num_gt: Optional[int] = None
                   ) -> Tuple[float, np.ndarray, np.ndarray]:
    """Hungarian-matched mIoU (module doc, step 8) of label maps of any shape (``gt`` 255 ignored):
    ``(mIoU, per-class IoU, prediction id -> matched ground-truth class, 0 when unmatched)``."""
    from scipy.optimize import linear_sum_assignment

    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = gt != IGNORE
    gt, pred = gt[keep], pred[keep]
    G = int(num_gt if num_gt is not None else gt.max() + 1)
    P = int(pred.max() + 1) if pred.size else 1
    conf = np.bincount(gt * P + pred, minlength=G * P).reshape(G, P).astype(np.float64)
    union = conf.sum(1)[:, None] + conf.sum(0)[None, :] - conf
    iou = conf / np.maximum(union, 1e-8)
    rows, cols = linear_sum_assignment(1 - iou)
    mapping = np.zeros(P, dtype=np.int64)
    mapping[cols] = rows
    re = mapping[pred]
    tp = np.bincount(gt[re == gt], minlength=G).astype(np.float64)
    fp = np.bincount(re[re != gt], minlength=G).astype(np.float64)
    fn = np.bincount(gt[re != gt], minlength=G).astype(np.float64)
    per = tp / np.maximum(tp + fp + fn, 1e-8)
    return float(per.mean()), per, mapping


@dataclass
class UnsupSegResult:
    """Per-image label maps and what led to them."""

    labels: np.ndarray            # N x S x S merged labels (0: background or unlinked, 1..: objects)
    fg_masks: np.ndarray          # N x S x S cluster-based foreground masks
    fg_clusters: np.ndarray       # N x S x S foreground clusters (k_community: background)
    communities: np.ndarray       # k_community + 1 community label per cluster
    precisions: np.ndarray        # k_fg cluster precisions
    threshold: float
    edges: List[Tuple[int, int, float]]
    metrics: Dict[str, object] = field(default_factory=dict)


def unsupervised_segmentation(feats: torch.Tensor, attn: torch.Tensor, *, k_fg: int = 200, k_community: int = 100,
                              pca_dim: int = 50, eval_size: int = 100, fg_threshold: Optional[float] = None,
                              weight_threshold: float = 0.05, merge: str = "infomap", markov_time: float = 1.0,
                              merge_seed: int = 1, resolution: float = 1.0, seed: int = 0,
                              gt: Optional[np.ndarray] = None, keep: float = 0.65,
                              attn_is_mask: bool = False) -> UnsupSegResult:
    """The whole pipeline (module doc) on ``N x h x w x D`` patch features and ``N x h x w`` CLS attention (or
    ready 0/1 masks with ``attn_is_mask``). ``gt``: ``N x S x S`` class maps at ``eval_size`` (255 ignored), used
    for the reference's threshold search when ``fg_threshold`` is None and for the mIoU; without ``gt`` and
    threshold, the cut at 65 % background clusters (the middle of the reference's search range) is used.
    ``merge``/``markov_time``/``merge_seed``/``resolution``: :func:`merge_communities`; ``seed``: the k-means."""
    N, h, w, D = feats.shape
    S = int(eval_size)
    x = normalize_and_pca(feats.reshape(-1, D).float().numpy(), pca_dim)
    c1 = kmeans_labels(x, k_fg, seed, spherical=True).reshape(N, 1, h, w)
    c1_up = F.interpolate(torch.from_numpy(c1).float(), size=(S, S), mode="nearest")[:, 0].long().numpy()
    masks = attn.float() if attn_is_mask else attention_masks(attn, keep)
    m_up = F.interpolate(masks[:, None].float(), size=(S, S), mode="nearest")[:, 0].numpy()
    precs = cluster_precisions(c1_up, m_up, k_fg)
    if fg_threshold is None:
        if gt is not None:
            fg_threshold = threshold_from_gt(c1_up, gt, precs)
        else:
            fg_threshold = float(np.sort(precs)[int(0.65 * k_fg)])
    fg = np.isin(c1_up, foreground_clusters(precs, fg_threshold))
    # cluster the foreground only, on embeddings nearest-upsampled to the evaluation size
    xe = torch.from_numpy(x).view(N, h, w, -1).permute(0, 3, 1, 2)
    xe = F.interpolate(xe, size=(S, S), mode="nearest").permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()
    fg_flat = fg.reshape(-1)
    if fg_flat.sum() < k_community:
        raise DensevitError(f"only {int(fg_flat.sum())} foreground cells for {k_community} clusters")
    c2 = np.full(N * S * S, k_community, dtype=np.int64)
    c2[fg_flat] = kmeans_labels(xe[fg_flat], k_community, seed)
    c2 = c2.reshape(N, S, S)
    adj = cooccurrence_matrix(c2, k_community + 1)
    edges = cooccurrence_edges(adj, weight_threshold)
    comm = merge_communities(edges, k_community + 1, method=merge, markov_time=markov_time, seed=merge_seed,
                             resolution=resolution)
    labels = comm[c2]
    res = UnsupSegResult(labels, fg.astype(np.uint8), c2, comm, precs, float(fg_threshold), edges)
    res.metrics["communities"] = int(np.unique(comm[comm > 0]).size)
    if gt is not None:
        miou, per, mapping = hungarian_miou(gt, labels, int(max(gt[gt != IGNORE].max() + 1, 2)))
        res.metrics.update({"miou": miou, "iou_per_class": per.tolist(),
                            "fg_iou": _jaccard(gt, fg)})
        res.metrics["matching"] = mapping.tolist()
    return res
