"""Linear centered kernel alignment (CKA) between representations, full-batch and minibatch.

* :func:`linear_cka`: CKA of two ``N x D`` representations of the same ``N`` examples, with the biased HSIC
  (Kornblith et al. 2019) or the unbiased estimator HSIC_1 (Song et al. 2012), which has no positive bias for
  independent features (needs ``N >= 4``).
* :class:`MinibatchCKA`: minibatch CKA (Nguyen, Raghu & Kornblith 2021): HSIC_1 of every (layer, layer) pair is
  summed over minibatches and ``CKA = sum HSIC_1(K, L) / sqrt(sum HSIC_1(K, K) * sum HSIC_1(L, L))``, so memory
  is one ``n x n`` Gram matrix per layer for a minibatch of ``n`` examples, however many examples are seen.
* :func:`model_cka`: CKA between all layers of one model, or between two models' layers, on the same images,
  with patch tokens as examples (each image's tokens, subsampled, form a minibatch). When two models' token grids
  differ (patch size or stride), the finer model's features are bilinearly resampled at the coarser model's
  token centres (in original-image pixels, through :class:`densevit.models.grid.TokenGrid`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DensevitError
from ...models.grid import TokenGrid

DEFAULT_MAX_TOKENS = 1024


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix ``N x N`` of ``N x D`` features (computed in float64)."""
    x = x.double().flatten(1)
    return x @ x.T


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC ``tr(K H L H) / (n-1)^2`` of two ``n x n`` Gram matrices (``... x n x n`` batched)."""
    n = K.shape[-1]
    return (_center_gram(K.double()) * _center_gram(L.double())).sum((-2, -1)) / (n - 1) ** 2


def _center_gram(K: torch.Tensor) -> torch.Tensor:
    return K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-2, -1), keepdim=True)


def hsic_biased_pairs(Ka: torch.Tensor, Kb: torch.Tensor) -> torch.Tensor:
    """Biased HSIC of every pair: ``Ka: A x n x n``, ``Kb: B x n x n`` -> ``A x B``."""
    n = Ka.shape[-1]
    return _center_gram(Ka.double()).flatten(1) @ _center_gram(Kb.double()).flatten(1).T / (n - 1) ** 2


def _zero_diag(K: torch.Tensor) -> torch.Tensor:
    return K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))


def hsic_unbiased_pairs(Ka: torch.Tensor, Kb: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 of every pair of Gram matrices: ``Ka: A x n x n``, ``Kb: B x n x n`` -> ``A x B``.

    ``HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with ``K~`` the
    Gram matrix with its diagonal zeroed; all pairs at once through three matrix products.
    """
    n = Ka.shape[-1]
    if n < 4:
        raise DensevitError(f"the unbiased HSIC needs at least 4 examples per minibatch, got {n}")
    Ka, Kb = _zero_diag(Ka.double()), _zero_diag(Kb.double())
    tr = Ka.flatten(1) @ Kb.flatten(1).T                                # tr(K~ L~) (symmetric Grams)
    ra, rb = Ka.sum(-1), Kb.sum(-1)                                     # K~ 1
    sa, sb = ra.sum(-1), rb.sum(-1)                                     # 1' K~ 1
    cross = ra @ rb.T                                                   # 1' K~ L~ 1
    return (tr + sa[:, None] * sb[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 of two ``n x n`` Gram matrices (scalar tensor)."""
    return hsic_unbiased_pairs(K[None], L[None])[0, 0]


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> float:
    """Linear CKA of ``N x Dx`` and ``N x Dy`` features of the same ``N`` examples (1 = same up to an orthogonal
    transform and isotropic scaling)."""
    if x.shape[0] != y.shape[0]:
        raise DensevitError(f"CKA needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]}")
    K, L = gram_linear(x - x.mean(0)), gram_linear(y - y.mean(0))
    hs = hsic_unbiased if unbiased else hsic_biased
    kl, kk, ll = hs(K, L), hs(K, K), hs(L, L)
    den = torch.sqrt(kk * ll)
    return float(kl / den) if den > 0 else float("nan")


class MinibatchCKA:
    """Minibatch linear CKA between ``num_a`` representations and ``num_b`` others (or among ``num_a`` themselves).

    >>> m = MinibatchCKA(12)                  # all layers of one model
    >>> m.update([feats_l0, ..., feats_l11])  # each n x D_l, the same n examples, any number of times
    >>> m.compute()                           # 12 x 12
    """

    def __init__(self, num_a: int, num_b: Optional[int] = None, unbiased: bool = True) -> None:
        self.num_a, self.num_b, self.unbiased = num_a, num_b, unbiased
        self.cross = torch.zeros(num_a, num_b or num_a, dtype=torch.float64)
        self.self_a = torch.zeros(num_a, dtype=torch.float64)
        self.self_b = torch.zeros(num_b or num_a, dtype=torch.float64)
        self.num_batches = 0
        self.num_examples = 0

    def _grams(self, feats: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        if any(f.shape[0] != n for f in feats):
            raise DensevitError("every representation in a minibatch must hold the same examples")
        # Centering first changes no HSIC value (linear kernel) and keeps float64 round-off small.
        return torch.stack([gram_linear(f.double() - f.double().mean(0)) for f in feats])

    def _hsic(self, Ka: torch.Tensor, Kb: torch.Tensor) -> torch.Tensor:
        if self.unbiased:
            return hsic_unbiased_pairs(Ka, Kb)
        return hsic_biased_pairs(Ka, Kb)

    def _hsic_self(self, K: torch.Tensor) -> torch.Tensor:
        """HSIC(K_i, K_i) for each representation (without the all-pairs product)."""
        if self.unbiased:
            return torch.stack([hsic_unbiased(k, k) for k in K])
        return hsic_biased(K, K)

    @torch.no_grad()
    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Add one minibatch: ``feats_a`` (``num_a`` tensors ``n x D``) and, for two sets, ``feats_b``."""
        if len(feats_a) != self.num_a or (self.num_b is not None) != (feats_b is not None) \
                or (feats_b is not None and len(feats_b) != self.num_b):
            raise DensevitError("MinibatchCKA.update got a different number of representations than declared")
        n = feats_a[0].shape[0]
        Ka = self._grams(feats_a, n)
        Kb = Ka if feats_b is None else self._grams(feats_b, n)
        cross = self._hsic(Ka, Kb).cpu()
        self.cross += cross
        if feats_b is None:                      # the diagonal already holds HSIC(K, K)
            self.self_a += torch.diagonal(cross)
            self.self_b = self.self_a
        else:
            self.self_a += self._hsic_self(Ka).cpu()
            self.self_b += self._hsic_self(Kb).cpu()
        self.num_batches += 1
        self.num_examples += n

    def compute(self) -> torch.Tensor:
        """``num_a x num_b`` CKA matrix (NaN where a representation is constant)."""
        if self.num_batches == 0:
            raise DensevitError("no minibatch was added to the CKA accumulator")
        den = torch.sqrt((self.self_a[:, None] * self.self_b[None, :]).clamp_min(0))
        return torch.where(den > 0, self.cross / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Optional[Sequence[torch.Tensor]] = None,
               unbiased: bool = True, batch_size: Optional[int] = None) -> torch.Tensor:
    """CKA between every pair of ``N x D`` representations (``feats_a`` with themselves or with ``feats_b``),
    in minibatches of ``batch_size`` consecutive examples (``None``: one batch)."""
    N = feats_a[0].shape[0]
    m = MinibatchCKA(len(feats_a), None if feats_b is None else len(feats_b), unbiased)
    bs = N if batch_size is None else int(batch_size)
    for s in range(0, N, bs):
        if N - s < 4 and s > 0:
            break  # a last minibatch under 4 examples has no unbiased HSIC
        sl = slice(s, s + bs)
        m.update([f[sl] for f in feats_a], None if feats_b is None else [f[sl] for f in feats_b])
    return m.compute()


def resample_tokens(feats: torch.Tensor, src: TokenGrid, dst: TokenGrid) -> torch.Tensor:
    """Bilinearly resample ``T_src x D`` token features at the token centres of ``dst`` (same original image):
    ``T_dst x D``. Identity when the grids coincide."""
    if src.shape == dst.shape and src.stride == dst.stride and src.patch_size == dst.patch_size \
            and tuple(src.input_hw) == tuple(dst.input_hw):
        return feats
    h, w = src.shape
    g = src.pixels_to_grid(dst.token_centers())                          # T_dst x 2 (col, row), continuous
    nx = 2 * g[:, 0] / max(w - 1, 1) - 1
    ny = 2 * g[:, 1] / max(h - 1, 1) - 1
    loc = torch.stack([nx, ny], -1).to(feats.device, torch.float32).view(1, 1, -1, 2)
    img = feats.float().T.reshape(1, -1, h, w)
    out = F.grid_sample(img, loc, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].T


def _layer_tokens(ext, x: torch.Tensor, layers: List[int], facet: str) -> List[torch.Tensor]:
    feats = ext.extract(x, layers=tuple(layers), facets=(facet,))
    return [feats.descriptors[(l, facet)][0] for l in layers]


def model_cka(exts: Sequence, images: Sequence, *, load_size: Optional[int] = 224, facet: str = "token",
              layers: Optional[Sequence[Optional[Iterable[int]]]] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
              unbiased: bool = True, seed: int = 0, progress: bool = True) -> Dict[Tuple[int, int], np.ndarray]:
    """Token-level minibatch CKA of every extractor's layers with themselves and with every other extractor's.

    Each image is one minibatch: its patch tokens are the examples, at most ``max_tokens`` of them (a seeded
    random subset shared by all layers; between two models, by both, on the coarser model's grid). Returns ``{(i, j): L_i x L_j array}`` for ``i <= j`` (``(i, i)``: within
    model ``i``). ``layers[i]`` picks the blocks of model ``i`` (``None``: all).
    """
    from tqdm.auto import tqdm

    from .attention import resolve_layers

    if not exts:
        raise DensevitError("no model given for CKA")
    lay = [resolve_layers(e.depth, None if layers is None else layers[i]) for i, e in enumerate(exts)]
    pairs = [(i, j) for i in range(len(exts)) for j in range(i, len(exts))]
    accs = {(i, j): MinibatchCKA(len(lay[i]), None if i == j else len(lay[j]), unbiased) for i, j in pairs}
    gen = torch.Generator().manual_seed(seed)
    for img in tqdm(images, desc="cka", disable=not progress, leave=False):
        per_model = []
        for e, ls in zip(exts, lay):
            x, grid = e.preprocess(img, load_size)
            per_model.append((grid, _layer_tokens(e, x, ls, facet)))
        # common grid: the coarsest one (fewest tokens)
        ref = min(range(len(exts)), key=lambda k: per_model[k][0].num_tokens)
        ref_grid = per_model[ref][0]
        T = ref_grid.num_tokens
        if T < 4:
            raise DensevitError(f"image gives only {T} tokens; CKA needs at least 4 (raise --load-size)")
        idx = torch.randperm(T, generator=gen)[:max_tokens] if T > max_tokens else torch.arange(T)
        own = {}
        for k, (grid, fs) in enumerate(per_model):
            # within one model: its own grid, subsampled on its own token count
            Tk = grid.num_tokens
            own_idx = torch.randperm(Tk, generator=gen)[:max_tokens] if Tk > max_tokens else torch.arange(Tk)
            own[k] = [f[own_idx.to(f.device)] for f in fs]
        common = {}
        if len(exts) > 1:
            for k, (grid, fs) in enumerate(per_model):
                common[k] = [resample_tokens(f, grid, ref_grid)[idx.to(f.device)] for f in fs]
        for i, j in pairs:
            if i == j:
                accs[(i, j)].update(own[i])
            else:
                accs[(i, j)].update(common[i], common[j])
        del per_model, own, common
    return {p: accs[p].compute().numpy() for p in pairs}
