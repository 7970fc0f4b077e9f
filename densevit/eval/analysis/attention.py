"""Attention statistics per head and layer: mean attention distance, entropy, CLS share, offset heads.

Everything is accumulated as per-head *sums* over images (:class:`AttentionAccumulator`), so images of
different sizes mix freely and only one layer's ``heads x T x T`` attention is ever held at a time.

Definitions (``q`` ranges over patch queries; CLS query rows are ignored):

* **mean distance** (patches): ``sum_k a[q, k] * |pos(q) - pos(k)|`` over *patch* keys, with the attention
  renormalised over patch keys (the CLS key has no position), averaged over queries. Positions are token-grid
  coordinates times ``stride / patch_size``, i.e. in units of one patch.
* **entropy** (nats): ``-sum_k a[q, k] log a[q, k]`` over *all* keys (CLS included), averaged over queries;
  ``entropy_norm`` divides each query's entropy by ``log(#keys)`` (1 = uniform), comparable across image sizes.
* **CLS share**: ``a[q, CLS]`` averaged over queries (NaN when the attention holds no CLS token).
* **offset heads**: for each query, the arg-max over *all* keys; a query whose arg-max is the CLS token hits no
  offset. For each candidate offset ``(dy, dx)`` (rows down, columns right, in token-grid steps,
  ``|dy|, |dx| <= radius``, ``(0, 0)`` excluded) the fraction is::

      #{queries q : argmax(q) = q + (dy, dx)} / #{queries q : q + (dy, dx) lies inside the grid}

  Border handling: a query whose target would fall outside the grid cannot hit that offset, so it is left out
  of that offset's denominator (there are ``(h - |dy|) * (w - |dx|)`` eligible queries per image). A perfect
  "attend to the right neighbour" head therefore scores 1.0 even though the last column has no right neighbour,
  and attending to the image edge does not register as an offset. The dominant offset is the candidate with the
  largest fraction; a head whose dominant fraction is ``>= threshold`` is an *offset local head*.
  ``self_fraction`` is the fraction of queries whose arg-max is the query itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...errors import DensevitError

DEFAULT_RADIUS = 2
DEFAULT_THRESHOLD = 0.5


def resolve_layers(depth: int, layers: Optional[Iterable[int]]) -> List[int]:
    """0-based block indices (negative counts from the end; ``None``: all ``depth`` blocks), checked."""
    if layers is None:
        return list(range(depth))
    out = []
    for l in layers:
        r = int(l) + depth if int(l) < 0 else int(l)
        if not 0 <= r < depth:
            raise DensevitError(f"layer {l} out of range (0..{depth - 1}, or negative)")
        out.append(r)
    return out


def grid_positions(grid_hw: Tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``Tx2 (row, col)`` float positions of a row-major ``h x w`` token grid."""
    h, w = grid_hw
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=1)


def offset_support(grid_hw: Tuple[int, int], radius: int) -> torch.Tensor:
    """``(2r+1)x(2r+1)`` number of queries whose target ``q + (dy, dx)`` lies inside an ``h x w`` grid.

    Entry ``[dy + r, dx + r]`` is ``max(h - |dy|, 0) * max(w - |dx|, 0)``.
    """
    h, w = grid_hw
    d = torch.arange(-radius, radius + 1, dtype=torch.float64).abs()
    return (h - d).clamp_min(0)[:, None] * (w - d).clamp_min(0)[None, :]


@dataclass
class LayerSums:
    """Per-head sums for one layer and one batch (all float64, on the CPU)."""

    n_queries: torch.Tensor      # heads (same for every head; kept per head for simplicity)
    distance: torch.Tensor       # heads, sum over queries of mean distance (patches)
    entropy: torch.Tensor        # heads, sum of entropies (nats)
    entropy_norm: torch.Tensor   # heads, sum of entropy / log(#keys)
    cls_share: torch.Tensor      # heads, sum of attention to CLS (0 without CLS)
    self_hits: torch.Tensor      # heads, queries whose arg-max is themselves
    offset_hits: torch.Tensor    # heads x (2r+1) x (2r+1)
    offset_support: torch.Tensor  # (2r+1) x (2r+1) eligible queries

    def __iadd__(self, other: "LayerSums") -> "LayerSums":
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


@torch.no_grad()
def layer_sums(attn: torch.Tensor, grid_hw: Tuple[int, int], has_cls: bool, *, patch_units: float = 1.0,
               radius: int = DEFAULT_RADIUS) -> LayerSums:
    """Per-head statistic sums of one layer's attention.

    Args:
        attn: ``B x heads x T x T`` attention probabilities (rows sum to 1), ``T = [1 +] h*w`` with the CLS token
            first when ``has_cls``; patch tokens in row-major grid order.
        grid_hw: token grid ``(h, w)``.
        patch_units: length of one grid step in patches (``stride / patch_size``).
        radius: largest ``|dy|``, ``|dx|`` of the candidate offsets (grid steps).
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise DensevitError(f"attention must be B x heads x T x T, got shape {tuple(attn.shape)}")
    h, w = grid_hw
    P = 1 if has_cls else 0
    if attn.shape[-1] != P + h * w:
        raise DensevitError(f"attention has {attn.shape[-1]} tokens, expected {P + h * w} for a {h}x{w} grid"
                            f"{' plus CLS' if has_cls else ''}")
    B, H, T, _ = attn.shape
    dev = attn.device
    pos = grid_positions(grid_hw, dev)
    dist = torch.cdist(pos, pos) * patch_units                          # hw x hw
    n_keys = T
    ent_sum = torch.zeros(H, dtype=torch.float64)
    ent_norm_sum = torch.zeros(H, dtype=torch.float64)
    dist_sum = torch.zeros(H, dtype=torch.float64)
    cls_sum = torch.zeros(H, dtype=torch.float64)
    K = 2 * radius + 1
    hits = torch.zeros(H, K * K, dtype=torch.float64)
    self_hits = torch.zeros(H, dtype=torch.float64)
    qr, qc = pos[:, 0].long(), pos[:, 1].long()
    log_keys = max(float(np.log(n_keys)), 1e-12)
    for hd in range(H):  # one head at a time keeps the temporaries at B x T x T
        a = attn[:, hd, P:, :].float()                                 # B x hw x T (patch queries, all keys)
        ent = -torch.special.xlogy(a, a).sum(-1)                       # B x hw
        ent_sum[hd] = ent.double().sum().cpu()
        ent_norm_sum[hd] = (ent / log_keys).double().sum().cpu()
        ap = a[:, :, P:]                                               # patch keys
        mass = ap.sum(-1).clamp_min(torch.finfo(ap.dtype).tiny)
        dist_sum[hd] = ((ap * dist).sum(-1) / mass).double().sum().cpu()
        if has_cls:
            cls_sum[hd] = a[:, :, 0].double().sum().cpu()
        arg = a.argmax(-1)                                             # B x hw over all keys
        is_patch = arg >= P
        k = (arg - P).clamp_min(0)
        dy = k // w - qr
        dx = k % w - qc
        self_hits[hd] = (is_patch & (dy == 0) & (dx == 0)).sum().double().cpu()
        inside = is_patch & (dy.abs() <= radius) & (dx.abs() <= radius)
        bins = ((dy + radius) * K + (dx + radius))[inside]
        hits[hd] = torch.bincount(bins, minlength=K * K).double().cpu()
    n_q = torch.full((H,), float(B * h * w), dtype=torch.float64)
    return LayerSums(n_q, dist_sum, ent_sum, ent_norm_sum, cls_sum, self_hits, hits.view(H, K, K),
                     offset_support(grid_hw, radius) * B)


@dataclass
class AttentionStats:
    """Per-layer, per-head attention statistics (arrays are ``L x heads``)."""

    layers: List[int]
    mean_distance: np.ndarray          # patches
    entropy: np.ndarray                # nats
    entropy_norm: np.ndarray           # entropy / log(#keys), 1 = uniform
    cls_share: np.ndarray              # NaN without a CLS token
    self_fraction: np.ndarray
    offset_fraction: np.ndarray        # fraction of the dominant offset
    offset: np.ndarray                 # L x heads x 2 (dy, dx) dominant offset, grid steps
    offset_fractions: np.ndarray       # L x heads x (2r+1) x (2r+1) every candidate's fraction ((0,0) = self)
    radius: int
    threshold: float
    n_queries: np.ndarray              # L
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def offset_heads(self) -> np.ndarray:
        """``L x heads`` boolean: heads whose dominant offset fraction reaches the threshold."""
        return self.offset_fraction >= self.threshold

    def offset_head_list(self) -> List[Dict[str, object]]:
        """The offset local heads as ``{"layer", "head", "dy", "dx", "fraction"}`` records."""
        out = []
        for i, j in zip(*np.nonzero(self.offset_heads)):
            out.append({"layer": int(self.layers[i]), "head": int(j), "dy": int(self.offset[i, j, 0]),
                        "dx": int(self.offset[i, j, 1]), "fraction": float(self.offset_fraction[i, j])})
        return out

    def records(self) -> List[Dict[str, object]]:
        """One row per (layer, head), for CSV output."""
        rows = []
        for i, l in enumerate(self.layers):
            for j in range(self.mean_distance.shape[1]):
                rows.append({
                    "layer": int(l), "head": j,
                    "mean_distance": float(self.mean_distance[i, j]),
                    "mean_distance_px": float(self.mean_distance[i, j] * self.meta.get("patch_size", float("nan"))),
                    "entropy": float(self.entropy[i, j]),
                    "entropy_norm": float(self.entropy_norm[i, j]), "cls_share": float(self.cls_share[i, j]),
                    "self_fraction": float(self.self_fraction[i, j]),
                    "offset_dy": int(self.offset[i, j, 0]), "offset_dx": int(self.offset[i, j, 1]),
                    "offset_fraction": float(self.offset_fraction[i, j]),
                    "offset_head": bool(self.offset_heads[i, j]),
                })
        return rows

    def to_json(self) -> Dict[str, object]:
        """JSON-ready summary (per-layer lists of per-head values; NaN, e.g. no CLS token, as None)."""
        def arr(a):
            return [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(a, dtype=float)]

        return {
            "layers": [int(l) for l in self.layers], "radius": self.radius, "threshold": self.threshold,
            "mean_distance": arr(self.mean_distance), "entropy": arr(self.entropy),
            "entropy_norm": arr(self.entropy_norm), "cls_share": arr(self.cls_share),
            "self_fraction": arr(self.self_fraction), "offset_fraction": arr(self.offset_fraction),
            "offset": self.offset.tolist(), "offset_heads": self.offset_head_list(),
            "n_queries": self.n_queries.tolist(), **self.meta,
        }


class AttentionAccumulator:
    """Accumulates :func:`layer_sums` over images, one layer at a time, then summarises.

    >>> acc = AttentionAccumulator(radius=2, threshold=0.5)
    >>> acc.update(layer, attn, grid_hw, has_cls=True)   # any number of times, any layer order
    >>> stats = acc.result()
    """

    def __init__(self, radius: int = DEFAULT_RADIUS, threshold: float = DEFAULT_THRESHOLD,
                 patch_units: float = 1.0) -> None:
        if radius < 1:
            raise DensevitError(f"offset radius must be >= 1, got {radius}")
        self.radius, self.threshold, self.patch_units = int(radius), float(threshold), float(patch_units)
        self._sums: Dict[int, LayerSums] = {}
        self._has_cls: Dict[int, bool] = {}

    def update(self, layer: int, attn: torch.Tensor, grid_hw: Tuple[int, int], has_cls: bool) -> None:
        """Add one batch of one layer's attention (``B x heads x T x T``)."""
        s = layer_sums(attn, grid_hw, has_cls, patch_units=self.patch_units, radius=self.radius)
        if layer in self._sums:
            if self._sums[layer].distance.shape != s.distance.shape:
                raise DensevitError(f"layer {layer}: head count changed between updates")
            self._sums[layer] += s
            self._has_cls[layer] = self._has_cls[layer] and has_cls
        else:
            self._sums[layer], self._has_cls[layer] = s, has_cls

    def result(self, meta: Optional[Dict[str, object]] = None) -> AttentionStats:
        """Per-head means and the offset-head summary."""
        if not self._sums:
            raise DensevitError("no attention was accumulated")
        layers = sorted(self._sums)
        r, K = self.radius, 2 * self.radius + 1
        cols: Dict[str, list] = {k: [] for k in ("dist", "ent", "entn", "cls", "self", "frac", "off", "fracs", "nq")}
        for l in layers:
            s = self._sums[l]
            n = s.n_queries.clamp_min(1)
            cols["dist"].append(s.distance / n)
            cols["ent"].append(s.entropy / n)
            cols["entn"].append(s.entropy_norm / n)
            cols["cls"].append(s.cls_share / n if self._has_cls[l] else torch.full_like(n, float("nan")))
            cols["self"].append(s.self_hits / n)
            sup = s.offset_support
            fr = torch.where(sup > 0, s.offset_hits / sup.clamp_min(1), torch.full_like(s.offset_hits, float("nan")))
            cols["fracs"].append(fr)
            cand = fr.clone().view(fr.shape[0], K * K)
            cand[:, r * K + r] = float("nan")                             # (0, 0) is not an offset
            cand = torch.nan_to_num(cand, nan=-1.0)
            best = cand.argmax(1)
            frac = cand.gather(1, best[:, None])[:, 0].clamp_min(0)
            off = torch.stack([best // K - r, best % K - r], dim=1)
            cols["frac"].append(frac)
            cols["off"].append(torch.where(frac[:, None] > 0, off, torch.zeros_like(off)))  # no hit: (0, 0)
            cols["nq"].append(float(s.n_queries[0]))
        st = lambda k: torch.stack(cols[k]).numpy()  # noqa: E731
        return AttentionStats(
            layers=layers, mean_distance=st("dist"), entropy=st("ent"), entropy_norm=st("entn"),
            cls_share=st("cls"), self_fraction=st("self"), offset_fraction=st("frac"), offset=st("off"),
            offset_fractions=st("fracs"), radius=r, threshold=self.threshold,
            n_queries=np.asarray(cols["nq"]), meta=dict(meta or {}))


def head_statistics(attn: torch.Tensor, grid_hw: Tuple[int, int], has_cls: bool, *, radius: int = DEFAULT_RADIUS,
                    threshold: float = DEFAULT_THRESHOLD, patch_units: float = 1.0, layer: int = 0) -> AttentionStats:
    """Statistics of one attention tensor ``B x heads x T x T`` (a one-layer :class:`AttentionStats`)."""
    acc = AttentionAccumulator(radius, threshold, patch_units)
    acc.update(layer, attn, grid_hw, has_cls)
    return acc.result()


def iter_layer_attention(ext, x: torch.Tensor, layers: Sequence[int]) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(layer, B x heads x T x T attention with CLS first)`` one layer at a time, from one forward pass
    (:meth:`ViTExtractor.iter_extract`), so only one layer's attention is alive at a time."""
    for layer, feats in ext.iter_extract(x, layers=tuple(layers), facets=("attn",), include_cls=True):
        yield layer, feats["attn"]


def attention_stats(ext, images: Sequence, *, load_size: Optional[int] = 224, layers: Optional[Iterable[int]] = None,
                    radius: int = DEFAULT_RADIUS, threshold: float = DEFAULT_THRESHOLD,
                    progress: bool = True, desc: str = "attention") -> AttentionStats:
    """Attention statistics of an extractor over images (paths or PIL images), one image and one layer at a time.

    The extractor must keep a CLS token (every registered backbone does); ``layers`` default to all blocks.
    """
    from tqdm.auto import tqdm

    layers = resolve_layers(ext.depth, layers)
    has_cls = getattr(ext.model, "cls_token", None) is not None
    acc = AttentionAccumulator(radius, threshold, patch_units=ext.stride / ext.patch_size)
    bar = tqdm(total=len(images) * len(layers), desc=desc, disable=not progress, leave=False)
    for img in images:
        x, grid = ext.preprocess(img, load_size)
        for layer, attn in iter_layer_attention(ext, x, layers):
            acc.update(layer, attn, grid.shape, has_cls)
            del attn
            bar.update(1)
    bar.close()
    meta = {"backbone": ext.spec.name, "patch_size": ext.patch_size, "stride": ext.stride,
            "load_size": load_size, "num_images": len(images)}
    return acc.result(meta)
