"""Spatial information per layer (Raghu et al. 2021, Fig. 9; Ghiasi et al. 2022): how much of a token's position
survives the blocks.

For each layer ``l`` and image, the similarity of every patch token ``t_l[q]`` to the *input* patch embeddings
``e[p]`` at every position ``p`` (the tokens entering block 0: patch embedding plus learned positions; rotary
backbones add their positions inside attention, so their input embeddings carry content only)::

    S_l[q, p] = cos(t_l[q], e[p])        (T x T per image; rows: token position, columns: input position)

Summaries per layer: ``own_share`` = share of tokens whose most similar input embedding is the one at their own
position (1.0 when position is fully preserved), ``own_similarity`` / ``other_similarity``: mean ``S[q, q]`` and
mean ``S[q, p != q]``. Maps of selected query positions are averaged over images (all images run at one square
input size so the grids agree). Raghu et al. compare with CKA across a dataset; this per-image cosine needs no
dataset of one size and gives the same picture (a localised bump at the token's own position, flattening with
depth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DensevitError
from .attention import resolve_layers

__all__ = ["SpatialStats", "position_similarity", "own_position_share", "query_positions", "spatial_information"]


def position_similarity(tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B] x T x T`` of tokens ``[B] x T x D`` (rows) to input embeddings ``[B] x T x D``
    (columns), both in row-major grid order."""
    if tokens.shape != embeddings.shape:
        raise DensevitError(f"tokens {tuple(tokens.shape)} and embeddings {tuple(embeddings.shape)} differ in shape")
    return F.normalize(tokens.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).transpose(-1, -2)


def own_position_share(sim: torch.Tensor) -> float:
    """Share of rows of ``[B] x T x T`` similarities whose arg-max is their own position (the diagonal)."""
    T = sim.shape[-1]
    return float((sim.argmax(-1) == torch.arange(T, device=sim.device)).float().mean())


def query_positions(grid_hw: Tuple[int, int], per_side: int) -> List[Tuple[int, int]]:
    """``per_side x per_side`` evenly spread ``(row, col)`` grid positions (corners included)."""
    h, w = grid_hw
    rows = np.unique(np.linspace(0, h - 1, per_side).round().astype(int))
    cols = np.unique(np.linspace(0, w - 1, per_side).round().astype(int))
    return [(int(r), int(c)) for r in rows for c in cols]


@dataclass
class SpatialStats:
    """Per-layer spatial information of one model."""

    layers: List[int]
    grid_hw: Tuple[int, int]
    queries: List[Tuple[int, int]]
    maps: np.ndarray              # L x Q x h x w mean similarity of query q's token to every input position
    own_share: np.ndarray         # L
    own_similarity: np.ndarray    # L
    other_similarity: np.ndarray  # L
    meta: Dict[str, object] = field(default_factory=dict)

    def records(self) -> List[Dict[str, object]]:
        """One row per layer (CSV)."""
        return [{"layer": int(l), "own_share": float(a), "own_similarity": float(b), "other_similarity": float(c)}
                for l, a, b, c in zip(self.layers, self.own_share, self.own_similarity, self.other_similarity)]

    def to_json(self) -> Dict[str, object]:
        return {"layers": [int(l) for l in self.layers], "grid_hw": list(self.grid_hw),
                "queries": [list(q) for q in self.queries], "own_share": self.own_share.tolist(),
                "own_similarity": self.own_similarity.tolist(), "other_similarity": self.other_similarity.tolist(),
                **self.meta}


@torch.inference_mode()
def input_embeddings(ext, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens entering block 0 (``B x T x D``, prefix tokens dropped)."""
    tokens, _, _ = ext.adapter.embed(x.to(ext.device, ext.dtype), ext.stride)
    return tokens[:, ext.num_prefix_tokens:]


def spatial_information(ext, images: Sequence, *, load_size: int = 224, layers: Optional[Iterable[int]] = None,
                        queries_per_side: int = 3, progress: bool = True, desc: str = "spatial") -> SpatialStats:
    """:class:`SpatialStats` of an extractor over images (paths or PIL images), each resized to
    ``load_size x load_size`` so every image has the same grid."""
    from tqdm.auto import tqdm

    layers = resolve_layers(ext.depth, layers)
    if not images:
        raise DensevitError("no images given")
    sums: Dict[int, Dict[str, object]] = {}
    grid_hw, queries, qidx = None, None, None
    for img in tqdm(images, desc=desc, disable=not progress, leave=False):
        x, grid = ext.preprocess(img, (load_size, load_size))
        emb = input_embeddings(ext, x)[0]
        if grid_hw is None:
            grid_hw = grid.shape
            queries = query_positions(grid_hw, queries_per_side)
            qidx = torch.tensor([r * grid_hw[1] + c for r, c in queries])
        for layer, feats in ext.iter_extract(x, layers=layers, facets=("token",)):
            sim = position_similarity(feats["token"][0], emb)                      # T x T
            T = sim.shape[0]
            diag = sim.diagonal()
            s = sums.setdefault(layer, {"maps": torch.zeros(len(queries), T), "own": 0.0, "sim": 0.0, "oth": 0.0,
                                        "n": 0})
            s["maps"] += sim[qidx.to(sim.device)].cpu()
            s["own"] += own_position_share(sim)
            s["sim"] += float(diag.mean())
            s["oth"] += float((sim.sum() - diag.sum()) / max(T * T - T, 1))
            s["n"] += 1
    n = len(images)
    h, w = grid_hw
    return SpatialStats(
        layers=layers, grid_hw=tuple(grid_hw), queries=queries,
        maps=np.stack([(sums[l]["maps"] / n).view(len(queries), h, w).numpy() for l in layers]),
        own_share=np.array([sums[l]["own"] / n for l in layers]),
        own_similarity=np.array([sums[l]["sim"] / n for l in layers]),
        other_similarity=np.array([sums[l]["oth"] / n for l in layers]),
        meta={"backbone": ext.spec.name, "load_size": load_size, "stride": ext.stride, "num_images": n})
