"""Refinements of label maps and masks that several applications share: the dense CRF (part co-segmentation,
object discovery) with its guided-filter fallback, and TokenCut's fast bilateral solver (object discovery).

Dense CRF backends (``crf``): ``"dense"`` uses pydensecrf (the ``crf`` extra: ``pip install pydensecrf2``,
built from source, needs a C++ compiler); ``"approx"`` is the documented fallback used by ``"auto"`` when
pydensecrf is not importable: the same mean-field updates of the same Potts model, where the Gaussian kernel's
message is an exact Gaussian blur (OpenCV) and the bilateral kernel's message is approximated by an edge-aware
colour guided filter (He et al. 2010; radius = bilateral sxy, eps = (srgb / 255)^2) instead of the permutohedral
lattice; ``"none"`` takes the unary argmax (nearest token). Results of the two CRF backends are close but not
identical.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

from densevit.errors import DensevitError

__all__ = ["CRF_BACKENDS", "crf_backend", "dense_crf", "bilateral_solve"]

CRF_BACKENDS = ("auto", "dense", "approx", "none")


# ------------------------------------------------------------------------------------------------ dense CRF
def crf_backend(requested: str = "auto") -> str:
    """The CRF backend that will run: ``"dense"`` if pydensecrf imports (or is required), else ``"approx"``."""
    if requested not in CRF_BACKENDS:
        raise DensevitError(f"unknown CRF backend {requested!r}; choose from {', '.join(CRF_BACKENDS)}")
    if requested in ("approx", "none"):
        return requested
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        if requested == "dense":
            raise DensevitError("dense CRF requested but pydensecrf is not installed "
                                "(pip install 'densevit[crf]' or pydensecrf2; or use --crf approx)") from None
        return "approx"
    return "dense"


def _softmax_neg(energy: np.ndarray) -> np.ndarray:
    e = -energy - (-energy).max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (borders: reflected), any number of channels (last axis)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    chans = [cv2.boxFilter(np.ascontiguousarray(flat[..., s:s + 256]), -1, (2 * r + 1, 2 * r + 1),
                           borderType=cv2.BORDER_REFLECT) for s in range(0, flat.shape[-1], 256)]
    out = np.concatenate([c.reshape(x.shape[0], x.shape[1], -1) for c in chans], axis=-1)
    return out.reshape(x.shape)


class _GuidedFilter:
    """Colour guided filter (He et al. 2010) with a fixed RGB guide: ``filter(p HxWxC) -> HxWxC``."""

    def __init__(self, guide: np.ndarray, radius: int, eps: float) -> None:
        I = guide.astype(np.float32) / 255.0                                   # HxWx3
        self.I, self.r = I, max(1, int(round(radius)))
        self.mean_I = _box(I, self.r)
        corr = _box(I[..., :, None] * I[..., None, :], self.r)               # HxWx3x3
        cov = corr - self.mean_I[..., :, None] * self.mean_I[..., None, :]
        self.inv = np.linalg.inv(cov + eps * np.eye(3, dtype=np.float32)).astype(np.float32)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        mean_p = _box(p, self.r)                                               # HxWxC
        corr_Ip = _box(self.I[..., :, None] * p[..., None, :], self.r)        # HxWx3xC
        cov_Ip = corr_Ip - self.mean_I[..., :, None] * mean_p[..., None, :]
        a = np.einsum("hwij,hwjc->hwic", self.inv, cov_Ip)                    # HxWx3xC
        b = mean_p - np.einsum("hwic,hwi->hwc", a, self.mean_I)
        return np.einsum("hwic,hwi->hwc", _box(a, self.r), self.I) + _box(b, self.r)


def dense_crf(image_rgb: np.ndarray, unary: np.ndarray, backend: str = "auto", iters: int = 10,
              gaussian_sxy: float = 3.0, gaussian_compat: float = 50.0, bilateral_sxy: float = 5.0,
              bilateral_srgb: float = 13.0, bilateral_compat: float = 15.0) -> Tuple[np.ndarray, str]:
    """Potts dense-CRF labelling of an image.

    image_rgb: ``HxWx3`` uint8; unary: ``HxWxL`` energies (lower = more likely). Returns
    ``(labels HxW int64, backend used)``; backends as in the module docstring.
    """
    kind = crf_backend(backend)
    H, W, L = unary.shape
    unary = np.ascontiguousarray(unary, dtype=np.float32)
    if kind == "none" or iters == 0:
        return unary.argmin(axis=-1), kind
    if kind == "dense":
        import pydensecrf.densecrf as dcrf

        d = dcrf.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(-1, L).T))
        d.addPairwiseGaussian(sxy=(gaussian_sxy, gaussian_sxy), compat=gaussian_compat, kernel=dcrf.DIAG_KERNEL,
                              normalization=dcrf.NORMALIZE_SYMMETRIC)
        d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.array(image_rgb, np.uint8, order="C"),
                               compat=bilateral_compat, kernel=dcrf.DIAG_KERNEL,
                               normalization=dcrf.NORMALIZE_SYMMETRIC)
        q = np.asarray(d.inference(int(iters)))
        return q.argmax(axis=0).reshape(H, W), kind
    # approx: mean field, Q <- softmax(-U + w_g * G(Q) + w_b * B(Q)) (Potts; messages are normalised averages)
    guided = _GuidedFilter(image_rgb, bilateral_sxy, (bilateral_srgb / 255.0) ** 2)
    q = _softmax_neg(unary)
    for _ in range(int(iters)):
        msg = gaussian_compat * cv2.GaussianBlur(q, (0, 0), gaussian_sxy, borderType=cv2.BORDER_REFLECT)
        if q.ndim == 2:  # OpenCV drops a trailing singleton channel
            msg = msg[..., None]
        msg = msg.reshape(H, W, L) + bilateral_compat * guided(q)
        q = _softmax_neg(unary - msg)
    return q.argmax(axis=-1), kind


# ------------------------------------------------------------------------------------------ bilateral solver
_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def bilateral_solve(image_rgb: np.ndarray, target: np.ndarray, confidence: float = 0.999,
                    sigma_spatial: float = 16.0, sigma_luma: float = 16.0, sigma_chroma: float = 8.0,
                    lam: float = 256.0, a_diag_min: float = 1e-5, cg_tol: float = 1e-5,
                    cg_maxiter: int = 25) -> np.ndarray:
    """The fast bilateral solver (Barron & Poole 2016) as TokenCut's ``bilateral_solver.py`` runs it.

    ``image_rgb`` ``HxWx3`` uint8 is the reference, ``target`` ``HxW`` the values to smooth (confidence
    ``confidence`` everywhere). Pixels are splatted onto the vertices of a 5-D grid (x, y over ``sigma_spatial``,
    luma over ``sigma_luma``, the two chroma channels over ``sigma_chroma``, each truncated to an integer); the
    blur is ``2 * 5`` times the vertex plus its 10 grid neighbours; the grid is bistochastised (10 iterations);
    ``(lam * (Dm - Dn B Dn) + diag(S w)) y = S (x w)`` is solved by Jacobi-preconditioned CG (``cg_maxiter``
    iterations, tolerance ``cg_tol``) from the flat initialisation, and sliced back to pixels. Vertices are found
    with an exact mixed-radix key (the reference's base-255 hash, without its size limit). Returns ``HxW``
    float64.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    im = np.asarray(image_rgb, np.float64)
    H, W = target.shape
    if im.shape[:2] != (H, W):
        raise DensevitError(f"bilateral solver: image {im.shape[:2]} and target {(H, W)} differ in size")
    yuv = np.tensordot(im, _RGB_TO_YUV, ([2], [1])) + np.array([0.0, 128.0, 128.0])
    Iy, Ix = np.mgrid[:H, :W]
    coords = np.stack([(Ix / sigma_spatial).astype(np.int64), (Iy / sigma_spatial).astype(np.int64),
                       (yuv[..., 0] / sigma_luma).astype(np.int64), (yuv[..., 1] / sigma_chroma).astype(np.int64),
                       (yuv[..., 2] / sigma_chroma).astype(np.int64)], axis=-1).reshape(-1, 5)
    coords = coords - coords.min(axis=0) + 1                         # >= 1: the -1 neighbours stay >= 0
    base = coords.max(axis=0) + 2
    radix = np.concatenate([[1], np.cumprod(base[:-1])]).astype(np.int64)
    keys, vertex = np.unique(coords @ radix, return_inverse=True)
    nv, npix = len(keys), H * W
    S = sp.csr_matrix((np.ones(npix), (vertex.reshape(-1), np.arange(npix))), shape=(nv, npix))
    rows, cols = [], []
    for d in range(5):                                               # the grid's 10 neighbour directions
        for off in (-1, 1):
            nb = keys + off * radix[d]
            loc = np.clip(np.searchsorted(keys, nb), 0, nv - 1)
            ok = np.flatnonzero(keys[loc] == nb)
            rows.append(ok)
            cols.append(loc[ok])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    B = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(nv, nv)) + 10.0 * sp.identity(nv, format="csr")
    m = np.asarray(S.sum(axis=1)).reshape(-1)
    n = np.ones(nv)
    for _ in range(10):                                              # bistochastisation
        n = np.sqrt(n * m / (B @ n))
    m = n * (B @ n)
    Dn = sp.diags(n)
    w = np.full(npix, float(confidence))
    x = np.asarray(target, np.float64).reshape(-1)
    w_splat = S @ w
    A = lam * (sp.diags(m) - Dn @ B @ Dn) + sp.diags(w_splat)
    b = S @ (x * w)
    M = sp.diags(1.0 / np.maximum(A.diagonal(), a_diag_min))
    y, _ = cg(A, b, x0=b / w_splat, M=M, maxiter=cg_maxiter, rtol=cg_tol)
    return (S.T @ y).reshape(H, W)
