"""PNG figures of the spatial-information, robustness and neuron analyses (matplotlib's object API, Agg canvas),
each written through the atomic writer."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...io.files import atomic_write
from .neurons import NeuronImage
from .robustness import RobustnessStats
from .spatial import SpatialStats

DPI = 110


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Write a figure as PNG atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _colours(n: int):
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def plot_spatial_maps(st: SpatialStats, path: Path, *, max_layers: int = 12) -> Path:
    """Rows: layers; columns: query tokens (red dot); each cell: the query token's similarity to the input
    embedding at every position (Raghu et al.'s Fig. 9 layout)."""
    idx = np.unique(np.linspace(0, len(st.layers) - 1, min(max_layers, len(st.layers))).round().astype(int))
    Q = len(st.queries)
    fig = _figure(1.0 + 1.05 * Q, 0.6 + 1.0 * len(idx))
    axes = fig.subplots(len(idx), Q, squeeze=False)
    vmin, vmax = float(np.nanmin(st.maps[idx])), float(np.nanmax(st.maps[idx]))
    im = None
    for r, li in enumerate(idx):
        for c, (qy, qx) in enumerate(st.queries):
            ax = axes[r, c]
            im = ax.imshow(st.maps[li, c], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.scatter([qx], [qy], s=22, c="red", edgecolors="white", linewidths=0.8, clip_on=False, zorder=3)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"L{st.layers[li]}", fontsize=8)
            if r == 0:
                ax.set_title(f"({qy},{qx})", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6).set_label("cosine to input embedding")
    fig.suptitle(f"{st.meta.get('backbone', '')}: token (red dot) vs input patch embeddings, per layer", fontsize=9)
    return save_png(fig, path)


def plot_spatial_summary(stats: Mapping[str, SpatialStats], path: Path) -> Path:
    """Share of tokens most similar to their own input position, per layer (one line per model), and the mean
    similarity to the own / other positions."""
    fig = _figure(8.4, 3.4)
    a, b = fig.subplots(1, 2)
    for (label, st), col in zip(stats.items(), _colours(len(stats))):
        a.plot(st.layers, st.own_share, marker="o", color=col, label=label)
        b.plot(st.layers, st.own_similarity, marker="o", color=col, label=f"{label}: own position")
        b.plot(st.layers, st.other_similarity, marker="x", ls="--", color=col, label=f"{label}: other positions")
    a.set_ylim(0, 1.02)
    a.set_xlabel("layer")
    a.set_ylabel("share of tokens")
    a.set_title("most similar input embedding is the own position", fontsize=9)
    b.set_xlabel("layer")
    b.set_ylabel("mean cosine")
    b.set_title("similarity to input embeddings", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_robustness(st: RobustnessStats, path: Path) -> Path:
    """Rows: pixel masking / token dropping; columns: last-layer descriptor cosine, CLS cosine (and top-1 when
    measured), one line per drop mode against the dropped share."""
    cols = 3 if st.top1 is not None else 2
    fig = _figure(3.2 * cols, 2.6 * len(st.occlusions))
    axes = fig.subplots(len(st.occlusions), cols, squeeze=False)
    x = np.asarray(st.ratios) * 100
    for o, occ in enumerate(st.occlusions):
        for m, (mode, col) in enumerate(zip(st.modes, _colours(len(st.modes)))):
            axes[o, 0].plot(x, st.descriptor_cos[o, m, :, -1], marker="o", ms=3, color=col, label=mode)
            axes[o, 1].plot(x, st.cls_cos[o, m, :, -1], marker="o", ms=3, color=col, label=mode)
            if st.top1 is not None:
                axes[o, 2].plot(x, st.top1[o, m] * 100, marker="o", ms=3, color=col, label=mode)
        titles = [f"{occ}: patch tokens (L{st.layers[-1]})", f"{occ}: CLS (L{st.layers[-1]})", f"{occ}: top-1"]
        for c in range(cols):
            ax = axes[o, c]
            ax.set_title(titles[c], fontsize=9)
            ax.set_xlabel("patches dropped (%)")
            ax.set_ylabel("top-1 (%)" if c == 2 else "cosine to unoccluded")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{st.meta.get('backbone', '')}: occlusion robustness ({st.meta.get('num_images')} images)",
                 fontsize=9)
    return save_png(fig, path)


def plot_robustness_layers(st: RobustnessStats, path: Path) -> Path:
    """Per occlusion and drop mode, a layer x dropped-share heat map of the patch tokens' cosine to the unoccluded
    run."""
    O, M = len(st.occlusions), len(st.modes)
    fig = _figure(2.9 * M + 0.8, 2.6 * O)
    axes = fig.subplots(O, M, squeeze=False)
    im = None
    for o, occ in enumerate(st.occlusions):
        for m, mode in enumerate(st.modes):
            ax = axes[o, m]
            im = ax.imshow(st.descriptor_cos[o, m].T, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1,
                           interpolation="nearest")
            ax.set_xticks(range(len(st.ratios)), [f"{int(round(r * 100))}" for r in st.ratios], fontsize=6)
            ax.set_yticks(range(len(st.layers)), [str(l) for l in st.layers], fontsize=6)
            ax.set_xlabel("dropped (%)", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{occ} / {mode}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.7).set_label("patch-token cosine to unoccluded")
    return save_png(fig, path)


def plot_neurons(items: Sequence[NeuronImage], path: Path, *, title: str = "") -> Path:
    """A grid of activation-maximisation images (title: unit, activation before -> after)."""
    n = len(items)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig = _figure(1.5 * cols, 1.7 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, it in zip(axes.ravel(), items):
        ax.imshow(it.image)
        ax.set_title(f"{it.unit}: {it.start:.2f}->{it.end:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
