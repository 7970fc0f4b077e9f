"""Upsample Anything (Seo et al. 2025): a per-image test-time optimisation of anisotropic joint-bilateral kernels.

Each low-res cell carries a kernel: spatial sigmas ``sigma_x, sigma_y`` (output pixels), an orientation ``theta``
and a range sigma ``sigma_r``. They are fitted by reconstructing the guide image (in ``[0, 1]``) from its
bicubically downsampled copy with the same kernels (L1 loss), then applied to the features. Defaults are those of
the official code (github.com/seominseok0429/Upsample-Anything-A-Simple-and-Hard-to-Beat-Baseline-for-Feature-
Upsampling, ``UPA`` and ``LearnablePixelwiseAnisoJBU_NoParent``): parameters stored as ``log sigma`` (initial
sigma 16 output pixels, range sigma 0.12) and ``theta_raw = 0`` with ``theta = pi * tanh(theta_raw)``; Adam
at lr 0.1 with the per-step decay ``(1e-9 / 1e-1) ** (1 / 5100)``; 51 optimiser steps (the official loop stops at
step 50 of its 5100-step schedule); window radius 8 cells, shrunk per pixel to ``ceil(2 * max(sigma_x,
sigma_y))`` (a disc); the window centred on the nearest cell, clamped at the border (edge cells repeat).

Precision: float32 on CPU; on CUDA, like the official code, the fit runs under float16 autocast with a
``GradScaler`` (the kernels are element-wise, which autocast keeps in float32, so both paths agree to round-off).
densevit evaluates the kernels over chunks of output rows (the official code chunks neighbours and channels);
the sums are the same up to round-off. The fit needs ``H = s * h`` and ``W = s * w`` for one integer ``s``
(as the official code assumes); for other output sizes it runs at ``(s*h, s*w)`` with ``s = max(1, round(H / h))``
and the result is resized bilinearly.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .memory import FLOAT, working_budget
from .window import Window, check_inputs, output_size, rows_for, weighted_sum, windows

STEPS = 51            # optimiser steps the official loop makes (it breaks at step == 50)
SCHEDULE_STEPS = 5100  # the official schedule length: lr * gamma ** step, gamma = (1e-9 / lr) ** (1 / 5100)
LR, FINAL_LR = 1e-1, 1e-9
INIT_SIGMA, INIT_SIGMA_R = 16.0, 0.12
RADIUS, ALPHA = 8, 2.0
#: Bytes held per (output pixel, window cell) by a chunk of the fit (forward tensors kept for the backward pass
#: and the backward's temporaries) and of the application (no graph).
FIT_PAIR_BYTES, APPLY_PAIR_BYTES = 768, 192


@dataclass
class Kernels:
    """Raw kernel parameters, each ``1 x 1 x h x w``: ``exp`` gives the sigmas, ``pi * tanh`` the angle."""

    sx_raw: torch.Tensor
    sy_raw: torch.Tensor
    th_raw: torch.Tensor
    sr_raw: torch.Tensor

    @classmethod
    def init(cls, h: int, w: int, device: torch.device, sigma: float = INIT_SIGMA,
             sigma_r: float = INIT_SIGMA_R) -> "Kernels":
        def full(value: float) -> torch.Tensor:
            return torch.full((1, 1, h, w), value, device=device, dtype=torch.float32, requires_grad=True)
        return cls(full(math.log(sigma)), full(math.log(sigma)), full(0.0), full(math.log(sigma_r)))

    def params(self) -> list:
        return [self.sx_raw, self.sy_raw, self.th_raw, self.sr_raw]

    def maps(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sigma_x, sigma_y, theta, sigma_r)``, each ``h x w``."""
        return (self.sx_raw.exp()[0, 0], self.sy_raw.exp()[0, 0], math.pi * torch.tanh(self.th_raw)[0, 0],
                self.sr_raw.exp()[0, 0])


def _log_weights(win: Window, kernels: Kernels, radius_map: torch.Tensor, guide: torch.Tensor,
                 guide_low: torch.Tensor, scale: int, hw: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
    """Log-weights ``K x P`` of one chunk and the clamped neighbour indices."""
    h, w = hw
    W = guide.shape[-1]
    rr, cc = win.rows.clamp(0, h - 1), win.cols.clamp(0, w - 1)
    flat = rr * w + cc
    pick = flat.reshape(-1)
    sx, sy, th, sr = (m.reshape(-1).index_select(0, pick).view_as(flat) for m in kernels.maps())
    sx, sy, sr = sx.clamp_min(1e-6), sy.clamp_min(1e-6), sr.clamp_min(1e-6)
    Y = torch.arange(win.y0, win.y1, device=guide.device, dtype=torch.float32)[:, None].expand(-1, W).reshape(-1)
    X = torch.arange(W, device=guide.device, dtype=torch.float32)[None, :].expand(win.y1 - win.y0, -1).reshape(-1)
    dx = X[None] - ((cc.float() + 0.5) * scale - 0.5)
    dy = Y[None] - ((rr.float() + 0.5) * scale - 0.5)
    cos_t, sin_t = torch.cos(th), torch.sin(th)
    x_p = dx * cos_t + dy * sin_t
    y_p = -dx * sin_t + dy * cos_t
    log_ws = -(x_p ** 2) / (2 * sx ** 2 + 1e-8) - (y_p ** 2) / (2 * sy ** 2 + 1e-8)
    pix = guide.reshape(3, -1)[:, win.y0 * W:win.y1 * W]
    diff2 = ((pix[:, None, :] - guide_low.reshape(3, -1).index_select(1, pick).view(3, *flat.shape)) ** 2).sum(0)
    log_wr = -diff2 / (2.0 * sr * sr + 1e-8)
    inside = (win.dy ** 2 + win.dx ** 2) <= radius_map.reshape(-1)[win.y0 * W:win.y1 * W][None] ** 2
    return (log_ws + log_wr).masked_fill(~inside, float("-inf")), rr, cc


def _radius_map(kernels: Kernels, out_hw: Tuple[int, int], radius: int, alpha: float) -> torch.Tensor:
    """Per-pixel window radius ``clamp(ceil(alpha * max(sigma_x, sigma_y)), 1, radius)``, ``H x W``."""
    with torch.no_grad():
        s = torch.maximum(kernels.sx_raw.exp(), kernels.sy_raw.exp())
        s = F.interpolate(s, size=out_hw, mode="bilinear", align_corners=False)
        return torch.ceil(alpha * s).clamp(1, radius).long()[0, 0]


def apply_kernels(features: torch.Tensor, guide: torch.Tensor, kernels: Kernels, scale: int,
                  radius: int = RADIUS, alpha: float = ALPHA, rows_per_chunk: Optional[int] = None,
                  budget: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The anisotropic joint-bilateral upsampling of ``C x h x w`` features guided by ``3 x H x W`` (``H = scale
    * h``) with fitted kernels: ``C x H x W``. Differentiable in the kernels (unless ``out`` is given: the chunks
    are then written into it). ``budget``: working bytes of one chunk (default: the gather budget)."""
    C, h, w = features.shape
    H, W = guide.shape[-2:]
    guide = guide.float()
    guide_low = F.interpolate(guide[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    radius_map = _radius_map(kernels, (H, W), radius, alpha)
    K = (2 * radius + 1) ** 2
    if budget is None:
        rows, gather = rows_per_chunk or rows_for(K, W, C), {}
    else:
        rows = rows_per_chunk or max(1, budget // 2 // max(1, W * (K * APPLY_PAIR_BYTES + 3 * FLOAT * C)))
        gather = {"budget": max(1, budget // 2 // (2 * FLOAT))}
    chunks = []
    for win in windows((h, w), (H, W), radius, rows, features.device, scale=(scale, scale)):
        log_w, rr, cc = _log_weights(win, kernels, radius_map, guide, guide_low, scale, (h, w))
        sums = weighted_sum(features, rr, cc, log_w, **gather).view(C, win.y1 - win.y0, W)
        if out is None:
            chunks.append(sums)
        else:
            out[:, win.y0:win.y1] = sums
    return torch.cat(chunks, dim=1) if out is None else out


def fit_kernels(guide: torch.Tensor, low_hw: Tuple[int, int], scale: int, steps: int = STEPS,
                lr: float = LR, final_lr: float = FINAL_LR, schedule_steps: int = SCHEDULE_STEPS,
                radius: int = RADIUS, alpha: float = ALPHA, init_sigma: float = INIT_SIGMA,
                init_sigma_r: float = INIT_SIGMA_R, amp: Optional[bool] = None,
                rows_per_chunk: Optional[int] = None, budget: Optional[int] = None) -> Kernels:
    """Fit the kernels on one ``3 x H x W`` guide in ``[0, 1]`` (``H = scale * h``): reconstruct it from its
    bicubic ``1/scale`` copy, L1 loss, Adam with the exponential schedule. The loss is evaluated over chunks of
    ``rows_per_chunk`` output rows (default: as many as keep ``K x rows x W`` within a sixteenth of
    :data:`~densevit.upsample.window.GATHER_BUDGET`), each back-propagated in turn: the same gradient as the
    official single pass (the loss is a sum over pixels) in bounded memory; ``budget`` (working bytes) sizes the
    chunks instead (:data:`FIT_PAIR_BYTES` per pixel and window cell). ``amp`` (default: on CUDA) is the
    official float16 autocast + GradScaler path."""
    h, w = low_hw
    H, W = guide.shape[-2:]
    guide = guide.float()
    device = guide.device
    amp = device.type == "cuda" if amp is None else bool(amp)
    low = F.interpolate(guide[None], scale_factor=1 / scale, mode="bicubic", align_corners=False)[0]
    if tuple(low.shape[-2:]) != (h, w):
        raise InvalidArgumentError(f"the guide of {H}x{W} is not {scale} x the {h}x{w} grid")
    kernels = Kernels.init(h, w, device, init_sigma, init_sigma_r)
    opt = torch.optim.Adam(kernels.params(), lr=lr)
    gamma = (final_lr / lr) ** (1.0 / schedule_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda step: gamma ** step)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else nullcontext
    guide_low = F.interpolate(guide[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    K = (2 * radius + 1) ** 2
    if budget is not None and rows_per_chunk is None:
        rows_per_chunk = max(1, budget // max(1, W * K * FIT_PAIR_BYTES))
    rows = rows_per_chunk or rows_for(K, W, 16)
    n = 3 * H * W
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        radius_map = _radius_map(kernels, (H, W), radius, alpha)
        for win in windows((h, w), (H, W), radius, rows, device, scale=(scale, scale)):
            with autocast():
                log_w, rr, cc = _log_weights(win, kernels, radius_map, guide, guide_low, scale, (h, w))
                pred = weighted_sum(low, rr, cc, log_w, budget=max(K * rows * W * 3, 1))
                target = guide.reshape(3, -1)[:, win.y0 * W:win.y1 * W]
                loss = (pred - target).abs().sum() / n
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    for p in kernels.params():
        p.requires_grad_(False)
    return kernels


def upsample_anything(features: torch.Tensor, image: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
                      steps: int = STEPS, rows_per_chunk: Optional[int] = None, amp: Optional[bool] = None,
                      max_bytes: Optional[int] = None, out: Optional[torch.Tensor] = None,
                      **fit_options) -> torch.Tensor:
    """Upsample ``B x C x h x w`` features to ``out_size`` (default: the image's size) with kernels fitted on
    each image of the ``B x 3 x H x W`` guide in ``[0, 1]``. ``fit_options``: ``lr``, ``final_lr``,
    ``schedule_steps``, ``radius``, ``alpha``, ``init_sigma``, ``init_sigma_r`` (see :func:`fit_kernels`).

    ``max_bytes`` bounds what the call allocates (:mod:`densevit.upsample.memory`): the output, the guide and
    the per-pixel window radii at the fit size, and the chunks of the fit and of the application (sized from
    what is left); ``out`` (``B x C x H x W``, may be a view) receives the result."""
    check_inputs(features, image)
    B, C, h, w = features.shape
    H, W = output_size(out_size, image)
    scale = max(1, int(round(H / h)))
    fit_hw = (scale * h, scale * w)
    n_fit = fit_hw[0] * fit_hw[1]
    resized = fit_hw != (H, W)
    fixed = B * n_fit * 3 * FLOAT * (2 if tuple(image.shape[-2:]) != fit_hw else 1) + n_fit * 8
    budget = working_budget("upsample_anything", FLOAT * B * C * H * W if out is None else 0, max_bytes, fixed)
    bounded = max_bytes is not None
    guide = image.float()
    if tuple(guide.shape[-2:]) != fit_hw:
        guide = F.interpolate(guide, size=fit_hw, mode="bilinear", align_corners=False).clamp(0, 1)
    apply_keys = {k: fit_options[k] for k in ("radius", "alpha") if k in fit_options}
    if out is None:
        out = features.new_empty(B, C, H, W)
    # Off the fit size, the channels go through the fit-size map in chunks (each then resized into the output).
    step = C if not resized else max(1, min(C, budget // 2 // (FLOAT * (n_fit + H * W))))
    for b in range(B):
        with torch.inference_mode(False), torch.enable_grad():  # callers may be in inference mode
            kernels = fit_kernels(guide[b].clone(), (h, w), scale, steps=steps, amp=amp,
                                  rows_per_chunk=rows_per_chunk, budget=budget if bounded else None,
                                  **fit_options)
        with torch.no_grad():
            for c0 in range(0, C, step):
                c1 = min(C, c0 + step)
                work = budget - (FLOAT * (c1 - c0) * (n_fit + H * W) if resized else 0)
                dest = features.new_empty(c1 - c0, *fit_hw) if resized else out[b, c0:c1]
                if dest.dtype != torch.float32:
                    dest = torch.empty(dest.shape, device=dest.device)
                res = apply_kernels(features[b, c0:c1].float(), guide[b], kernels, scale, out=dest,
                                    budget=max(work, 2 ** 20) if bounded else None, **apply_keys)
                if resized:
                    res = F.interpolate(res[None], size=(H, W), mode="bilinear", align_corners=False)[0]
                if res.data_ptr() != out[b, c0:c1].data_ptr():
                    out[b, c0:c1] = res
    return out
