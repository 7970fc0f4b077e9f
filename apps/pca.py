"""PCA of dense descriptors, the usual way to look at them (reference ``pca.py``).

The descriptors of all images of a set (default: key facet of layer 11, unbinned) are projected on their first
``n_components`` (4) principal components, fitted on all images together (``all_together``) or per image.
The reference shows the LAST three of the four components as RGB (the first one mostly separates foreground
from background); :func:`densevit.apps.draw.pca_rgb` does that with ``rgb=(-3, -2, -1)`` by default, so
``n_components=3`` shows the first three. Deterministic (scikit-learn's PCA with a fixed seed and its sign
convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from densevit.errors import DensevitError
from densevit.features.options import FeatureOptions
from densevit.models.grid import TokenGrid
from densevit.options import opt
from densevit.features.source import ImageInput

from .common import extract_set

__all__ = ["PCAConfig", "PCAImage", "descriptor_pca", "pca_features"]


@dataclass(frozen=True)
class PCAConfig(FeatureOptions):
    """What a PCA picture shows (defaults: the reference's ``pca.py``: key facet of layer 11, unbinned)."""

    n_components: int = opt(4, "principal components to fit")
    rgb: Optional[Tuple[int, int, int]] = opt(None, "components shown as R G B (0-based; default: the last three)",
                                              metavar="I")
    per_image: bool = opt(False, "fit one PCA per image instead of one per set", negatable=False)

    def validate(self) -> None:
        if self.n_components < 1:
            raise DensevitError(f"--n-components must be >= 1, got {self.n_components}")
        if self.rgb and any(not 0 <= i < self.n_components for i in self.rgb):
            raise DensevitError(f"--rgb components must lie in 0..{self.n_components - 1}")

    @property
    def shown(self) -> Tuple[int, int, int]:
        """The components drawn as R, G, B."""
        return tuple(self.rgb) if self.rgb else (-3, -2, -1)


@dataclass
class PCAImage:
    """One image's projected descriptors: ``components`` is ``h x w x n_components`` float32 on its token grid;
    ``explained`` the fitted PCA's explained-variance ratios."""

    name: str
    components: np.ndarray
    grid: TokenGrid
    explained: np.ndarray


def pca_features(descriptors: Sequence[torch.Tensor], grids: Sequence[TokenGrid], names: Sequence[str],
                 n_components: int = 4, all_together: bool = True, seed: int = 0) -> List[PCAImage]:
    """PCA of per-image descriptors (``T_i x D``); returns one :class:`PCAImage` per image. scikit-learn picks
    the solver (exact for small problems, randomised with ``seed`` for large ones): deterministic."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    if n_components < 1:
        raise DensevitError(f"number of components must be >= 1, got {n_components}")
    arrays = [d.float().cpu().numpy() for d in descriptors]
    groups = [list(range(len(arrays)))] if all_together else [[i] for i in range(len(arrays))]
    out: List[Optional[PCAImage]] = [None] * len(arrays)
    for g in groups:
        x = np.concatenate([arrays[i] for i in g])
        n = min(n_components, x.shape[0], x.shape[1])
        if n < n_components:
            raise DensevitError(f"cannot fit {n_components} components to {x.shape[0]} descriptors "
                                f"of {x.shape[1]} dimensions")
        # BLAS threads follow torch's setting (OpenBLAS's own pool ignores it and can thrash a busy machine)
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            pca = PCA(n_components=n, svd_solver="auto", random_state=seed).fit(x)
            proj = pca.transform(x).astype(np.float32)
        for i, part in zip(g, np.split(proj, np.cumsum([arrays[j].shape[0] for j in g])[:-1])):
            out[i] = PCAImage(names[i], part.reshape(*grids[i].shape, n), grids[i],
                              pca.explained_variance_ratio_.astype(np.float32))
    return out  # type: ignore[return-value]


def descriptor_pca(extractor, images: Sequence[ImageInput], load_size: Optional[int] = 224, layer: int = 11,
                   facet: str = "key", bin: bool = False, n_components: int = 4,
                   all_together: bool = True) -> List[PCAImage]:
    """Extract each image's descriptors (one pass each) and project them on their principal components."""
    if not images:
        raise DensevitError("no images given")
    feats = extract_set(extractor, images, load_size, layer, facet, bin, saliency=False)
    return pca_features([f.descriptors for f in feats], [f.grid for f in feats], [f.name for f in feats],
                        n_components, all_together)
