"""PNG plots of the analyses (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ...io.files import atomic_write
from .attention import AttentionStats

DPI = 120


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format=path.suffix.lstrip(".") or "png"))
    return path


def _auto_format(values: np.ndarray) -> str:
    """Enough decimals to tell the cells apart: 2, or 3-4 for small or nearly equal values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return "{:.2f}"
    top, spread = float(np.abs(v).max()), float(v.max() - v.min())
    if top < 0.01 or (0 < spread < 0.005):
        return "{:.4f}"
    if top < 0.1 or spread < 0.05:
        return "{:.3f}"
    return "{:.2f}"


def head_heatmap(values: np.ndarray, layers: Sequence[int], path: Path, *, title: str, label: str,
                 cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None,
                 offsets: Optional[np.ndarray] = None, arrow_min: float = 0.0,
                 highlight: Optional[np.ndarray] = None, annotate: bool = True, fmt: Optional[str] = None) -> Path:
    """Layer (rows) x head (columns) heat map of ``L x H`` values.

    ``offsets`` (``L x H x 2``, ``(dy, dx)``) draws an arrow from each cell's centre in that direction (down =
    positive dy, as in the image) where the value is ``>= arrow_min``; ``highlight`` (``L x H`` bool) outlines
    cells (the offset local heads).
    """
    from matplotlib.patches import Rectangle

    L, H = values.shape
    fmt = fmt or _auto_format(values)
    fig = _figure(max(5.2, 1.6 + 0.62 * H), max(3.2, 1.2 + 0.42 * L))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(H), [str(h) for h in range(H)])
    ax.set_yticks(range(L), [str(l) for l in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(label)
    lo, hi = im.get_clim()
    mid = (lo + hi) / 2
    for i in range(L):
        for j in range(H):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            colour = "black" if (cmap in ("viridis", "magma", "inferno", "plasma", "cividis")) == (v > mid) \
                else "white"
            arrow = offsets is not None and v >= arrow_min and np.any(offsets[i, j] != 0)
            if arrow:
                dy, dx = (float(t) for t in offsets[i, j])
                n = max(np.hypot(dx, dy), 1e-9)
                cy = i - 0.14                                  # arrow in the upper part, numbers below
                ax.annotate("", xy=(j + 0.24 * dx / n, cy + 0.2 * dy / n),
                            xytext=(j - 0.24 * dx / n, cy - 0.2 * dy / n),
                            arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6, mutation_scale=10))
            if annotate:
                txt = fmt.format(v)
                if arrow:
                    txt = f"{txt}\n({int(offsets[i, j, 0])},{int(offsets[i, j, 1])})"
                ax.text(j, i + (0.27 if arrow else 0.0), txt, ha="center", va="center",
                        fontsize=6 if arrow else 7, color=colour)
            if highlight is not None and highlight[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    return _save(fig, path)


def plot_attention_stats(stats: AttentionStats, out_dir: Path, prefix: str = "") -> Dict[str, Path]:
    """Head-by-layer heat maps: mean distance, offset fraction (with arrows), entropy, CLS share.

    Returns ``{kind: path}`` for kinds ``distance``, ``offset``, ``entropy``, ``cls_share``.
    """
    out_dir = Path(out_dir)
    name = stats.meta.get("backbone", "")
    tag = f"{name}\n" if name else ""
    n_img = stats.meta.get("num_images")
    sub = f" ({n_img} images)" if n_img else ""
    paths = {
        "distance": head_heatmap(stats.mean_distance, stats.layers, out_dir / f"{prefix}attn_distance.png",
                                 title=f"{tag}mean attention distance{sub}", label="patches", cmap="viridis",
                                 vmin=0.0),
        "offset": head_heatmap(
            stats.offset_fraction, stats.layers, out_dir / f"{prefix}attn_offset.png",
            title=f"{tag}offset heads: share of queries whose arg-max key\nis at the dominant offset (dy, dx); "
                  f"arrow if >= 0.05;\nred box: offset local head (>= {stats.threshold:g})",
            label="fraction of queries", cmap="magma", vmin=0.0, vmax=1.0, offsets=stats.offset,
            arrow_min=0.05, highlight=stats.offset_heads),
        "entropy": head_heatmap(stats.entropy_norm, stats.layers, out_dir / f"{prefix}attn_entropy.png",
                                title=f"{tag}attention entropy / log(#keys), 1 = uniform{sub}",
                                label="normalised entropy", cmap="cividis", vmin=0.0, vmax=1.0),
    }
    if np.isfinite(stats.cls_share).any():
        paths["cls_share"] = head_heatmap(stats.cls_share, stats.layers, out_dir / f"{prefix}attn_cls_share.png",
                                          title=f"{tag}attention to the CLS token{sub}", label="share",
                                          cmap="viridis", vmin=0.0)
    return paths


def _colours(n: int) -> List:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_distance_by_layer(stats: Mapping[str, AttentionStats], path: Path) -> Path:
    """Mean attention distance of every head against depth, one colour per model (local vs global by layer).

    In patches, or in resized-input pixels when the models' patch sizes differ (``stats[...].meta["patch_size"]``).
    """
    patch_sizes = {st.meta.get("patch_size") for st in stats.values()}
    in_pixels = len(patch_sizes) > 1 and None not in patch_sizes   # different patch sizes: compare in pixels
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for (label, st), c in zip(stats.items(), _colours(len(stats))):
        layers = np.asarray(st.layers)
        d = st.mean_distance * (float(st.meta["patch_size"]) if in_pixels else 1.0)
        jitter = (np.arange(d.shape[1]) - (d.shape[1] - 1) / 2) * (0.25 / max(d.shape[1], 1))
        ax.scatter((layers[:, None] + jitter[None, :]).ravel(), d.ravel(), s=12, color=c, alpha=0.6)
        ax.plot(layers, np.nanmean(d, axis=1), color=c, lw=2, label=f"{label} (head mean)")
        flagged = st.offset_heads
        if flagged.any():
            ii, jj = np.nonzero(flagged)
            ax.scatter(layers[ii] + jitter[jj], d[ii, jj], s=60, facecolors="none", edgecolors=c, lw=1.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (" + ("input pixels" if in_pixels else "patches") + ")")
    ax.set_ylim(bottom=0)
    ax.set_title("attention distance per head (circled: offset local heads)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cka(matrix: np.ndarray, layers_a: Sequence[int], layers_b: Sequence[int], path: Path, *,
             label_a: str, label_b: Optional[str] = None, title: Optional[str] = None) -> Path:
    """CKA matrix heat map (rows: ``label_a``'s layers, columns: ``label_b``'s; layer 0 at the bottom left)."""
    label_b = label_b or label_a
    La, Lb = matrix.shape
    fig = _figure(max(4.2, 1.6 + 0.36 * Lb), max(3.6, 1.2 + 0.32 * La))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="magma", vmin=0.0, vmax=1.0, origin="lower",
                   interpolation="nearest", aspect="auto")
    ax.set_xticks(range(Lb), [str(l) for l in layers_b])
    ax.set_yticks(range(La), [str(l) for l in layers_a])
    ax.set_xlabel(f"{label_b} layer")
    ax.set_ylabel(f"{label_a} layer")
    ax.set_title(title or (f"linear CKA: {label_a}" if label_a == label_b else f"linear CKA: {label_a} vs {label_b}"),
                 fontsize=10)
    if La * Lb <= 400:
        for i in range(La):
            for j in range(Lb):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, shrink=0.9).set_label("CKA")
    return _save(fig, path)


def plot_sweep(records: Sequence[Mapping[str, object]], task: str, path: Path, *, metric: str = "score") -> Path:
    """Score per layer for one task: one line per backbone (colour), one line style per facet."""
    rows = [r for r in records if r["task"] == task]
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    facets = list(dict.fromkeys(str(r["facet"]) for r in rows))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for m, c in zip(models, _colours(len(models))):
        for k, f in enumerate(facets):
            pts = sorted((int(r["layer"]), float(r[metric])) for r in rows if r["model"] == m and r["facet"] == f)
            if not pts:
                continue
            xs, ys = zip(*pts)
            lab = m if len(facets) == 1 else f"{m} / {f}"
            ax.plot(xs, ys, color=c, ls=styles[k % 4], marker=markers[k % 4], ms=4, label=lab)
            ys_arr = np.asarray(ys, dtype=float)
            if np.isfinite(ys_arr).any():
                b = int(np.nanargmax(ys_arr))
                ax.scatter([xs[b]], [ys[b]], s=120, marker="*", color=c, zorder=3)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric if metric != "score" else f"{task} score")
    ax.set_title(f"{task}: score per layer (star: best layer)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
