"""AnyUp (Wimmer et al., ICLR 2026): one learned upsampler for features of any backbone and dimension.

The architecture of the official code (github.com/wimmerth/anyup, ``anyup/model.py`` and ``anyup/layers``), with
the plain windowed cross-attention (the paper's model; the NATTEN variant is not provided) and the same parameter
names, so the official checkpoints ``anyup_paper.pth`` (trained on DINOv2 ViT-S/14) and
``anyup_multi_backbone.pth`` load strictly. Queries come from the image (RoPE-encoded, pooled to the output
size), keys from the image pooled to the feature grid plus a feature-unification encoding of the features; each
output pixel attends to the feature cells in a window of ``window_ratio`` of the image around it, and the
head-averaged attention weights the *unprojected* input features, so the output keeps their channels.

The guide ``image`` given to :func:`anyup` is the RGB image in ``[0, 1]``; it is ImageNet-normalised here, as
the official model expects.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, WeightsNotFoundError
from ..models.locate import describe_search, find_checkpoint
from ..models.weights import check_finite, read_checkpoint
from .memory import FLOAT, working_budget
from .window import check_inputs, output_size

CHECKPOINTS = ("anyup_multi_backbone.pth", "anyup_paper.pth")
"""The official checkpoint file names, in the order they are searched for."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (a 1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 1, bias=False),
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Conv2d(cout, cout, 1, bias=False))
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class FeatureUnification(nn.Module):
    """Learned feature unification: every channel convolved with ``n`` learned ``k x k`` filters (zero padding,
    border-normalised), a softmax over the filter axis, averaged over channels; any ``C`` in, ``n`` out.

    The filter and channel axes are split as the official code splits them: the depthwise output (index
    ``channel * n + filter``) is read as ``n x C`` row-major, and that layout is kept."""

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.n, self.k = n, k
        self.basis = nn.Parameter(torch.randn(n, 1, k, k))

    def forward(self, x: torch.Tensor, max_bytes: Optional[int] = None) -> torch.Tensor:
        """``B x C x h x w`` -> ``B x n x h x w``, over chunks of the softmax groups so that one chunk's
        ``n x chunk x h x w`` responses stay within ``max_bytes`` (default: all ``C`` at once)."""
        b, c, h, w = x.shape
        n, p = self.n, self.k // 2
        xp = F.pad(x, (p, p, p, p))
        norm = F.conv2d(F.pad(x.new_ones(1, 1, h, w), (p, p, p, p)), x.new_ones(1, 1, self.k, self.k))
        # Depthwise output channel j = channel * n + filter, read as (a, g) = divmod(j, C): softmax over a.
        step = c if max_bytes is None else max(1, min(c, int(max_bytes) // max(1, 5 * FLOAT * n * b * h * w)))
        a = torch.arange(n, device=x.device)
        out = x.new_zeros(b, n, h, w)
        for g0 in range(0, c, step):
            g1 = min(c, g0 + step)
            j = (a[:, None] * c + torch.arange(g0, g1, device=x.device)[None]).reshape(-1)   # n * m, (a, g)
            y = F.conv2d(xp.index_select(1, j // n), self.basis.index_select(0, j % n), groups=j.numel())
            y = torch.softmax((y / norm).view(b, n, g1 - g0, h, w), dim=1)
            out += y.sum(dim=2)
        return out / c


def _encoder(first: nn.Module, cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(first, ResBlock(cin, dim), ResBlock(dim, dim))


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="reflect", bias=False)


class RoPE(nn.Module):
    """2-D rotary embedding of ``(row, col)`` coordinates in ``[0, 1]``: the first half of the channels rotates
    with the row, the second with the column (frequencies ``2 pi * 100 ** -linspace(0, 1, dim / 4)``)."""

    def __init__(self, dim: int, theta: float = 100.0) -> None:
        super().__init__()
        f = theta ** torch.linspace(0, -1, dim // 4)
        f = torch.cat([f, f])
        freqs = torch.zeros(2, dim)
        freqs[0, :dim // 2] = f
        freqs[1, -dim // 2:] = f
        self.freqs = nn.Parameter(freqs * 2 * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> the same, rotated."""
        b, c, H, W = x.shape
        rows = torch.linspace(0, 1, H, device=x.device, dtype=x.dtype)
        cols = torch.linspace(0, 1, W, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).view(H * W, 2)
        angle = coords @ self.freqs
        t = x.permute(0, 2, 3, 1).reshape(b, H * W, c)
        t1, t2 = t.chunk(2, dim=-1)
        t = t * angle.cos() + torch.cat([-t2, t1], dim=-1) * angle.sin()
        return t.view(b, H, W, c).permute(0, 3, 1, 2)


def window_mask(out_hw: Tuple[int, int], low_hw: Tuple[int, int], ratio: float, device: torch.device
                ) -> torch.Tensor:
    """``(H*W) x (h*w)`` boolean: which feature cells each output pixel may attend to. A pixel at normalised
    position ``t = (i + 0.5) / H`` sees the cells ``[floor(clamp(t - ratio) * h), ceil(clamp(t + ratio) * h))``
    (the same along columns)."""
    def bounds(n_out: int, n_low: int) -> torch.Tensor:
        lo, hi = window_bounds(n_out, n_low, ratio, device)
        cells = torch.arange(n_low, device=device)
        return (cells[None] >= lo[:, None]) & (cells[None] < hi[:, None])
    rows = bounds(out_hw[0], low_hw[0])  # H x h
    cols = bounds(out_hw[1], low_hw[1])  # W x w
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(out_hw[0] * out_hw[1], -1)


class CrossAttention(nn.Module):
    """RMS-normalised queries and keys, multi-head attention probabilities averaged over heads (the parameters of
    ``nn.MultiheadAttention``; its value and output projections are unused, as in the official model)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(dim)
        self.norm_k = nn.RMSNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """``B x Q x D`` queries, ``B x N x D`` keys -> ``B x Q x N`` head-averaged attention."""
        dim = q.shape[-1]
        wq, wk, _ = self.attention.in_proj_weight.split(dim)
        bq, bk, _ = self.attention.in_proj_bias.split(dim)
        b, Q, _ = q.shape
        N = k.shape[1]
        hd = dim // self.heads
        qh = F.linear(self.norm_q(q), wq, bq).view(b, Q, self.heads, hd).transpose(1, 2)
        kh = F.linear(self.norm_k(k), wk, bk).view(b, N, self.heads, hd).transpose(1, 2)
        logits = (qh / math.sqrt(hd)) @ kh.transpose(-1, -2)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        return torch.softmax(logits, dim=-1).mean(dim=1)


class CrossAttentionBlock(nn.Module):
    """A 3x3 conv on the queries, then windowed cross-attention that averages the input features."""

    def __init__(self, dim: int, heads: int, window_ratio: float) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads)
        self.window_ratio = window_ratio
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_chunk: int = 4096) -> torch.Tensor:
        """The official computation: every query chunk against every cell, with the whole ``(H*W) x (h*w)``
        :func:`window_mask` (memory and time grow with pixels x cells; :meth:`AnyUp.forward` gathers each tile's
        window instead). Kept as the reference for small inputs and tests."""
        q = self.conv2d(q)
        b, d, H, W = q.shape
        h, w = k.shape[-2:]
        c = v.shape[1]
        allowed = window_mask((H, W), (h, w), self.window_ratio, q.device) if self.window_ratio > 0 else None
        q = q.permute(0, 2, 3, 1).reshape(b, H * W, d)
        k = k.permute(0, 2, 3, 1).reshape(b, h * w, d)
        v = v.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = []
        for s in range(0, H * W, q_chunk):
            a = None if allowed is None else allowed[s:s + q_chunk]
            out.append(self.cross_attn.probabilities(q[:, s:s + q_chunk], k, a) @ v)
        return torch.cat(out, dim=1).view(b, H, W, c).permute(0, 3, 1, 2)


def window_bounds(n_out: int, n_low: int, ratio: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cells ``[lo, hi)`` (along one axis) that each of ``n_out`` output positions sees (:func:`window_mask`);
    both non-decreasing in the position."""
    t = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) / n_out
    if ratio <= 0:
        return torch.zeros(n_out, dtype=torch.long, device=device), torch.full((n_out,), n_low, device=device)
    return ((t - ratio).clamp(0, 1) * n_low).floor().long(), ((t + ratio).clamp(0, 1) * n_low).ceil().long()


# ---------------------------------------------------------------- bounded-memory evaluation of the model
# The pixel-resolution part of AnyUp is pointwise (1x1 convs, RoPE) except its GroupNorms (global statistics)
# and the 3x3 conv on the queries. It is evaluated over chunks of rows of one channels-last ``B x H x W x d``
# buffer (a chunk of rows is contiguous, a 1x1 conv a matrix product): a GroupNorm's statistics are gathered in
# a pass over the buffer first (float64 sums of float32 chunk sums), a ResBlock updates the buffer in place (its
# inner activation recomputed per chunk rather than stored), the image encoding is recomputed from the image for
# the query branch instead of being kept beside the key branch, and the 3x3 conv runs per band of attention
# tiles. Equal to the module-by-module forward up to round-off.

Stats = Tuple[torch.Tensor, torch.Tensor]


class _StatsSum:
    """Per-(image, group) sums of a GroupNorm's input, gathered chunk by chunk of ``B x rows x W x C``."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        self.gn, self.s1, self.s2, self.n = gn, 0.0, 0.0, 0

    def add(self, t: torch.Tensor) -> None:
        b, r, W, c = t.shape
        g = self.gn.num_groups
        flat = t.reshape(b, r * W, c)
        ones = t.new_ones(b, 1, r * W)
        s1 = (ones @ flat).view(b, c).double()                  # float32 sums of one chunk, float64 across
        s2 = (ones @ flat.square()).view(b, c).double()
        self.s1 = self.s1 + s1.view(b, g, -1).sum(-1)
        self.s2 = self.s2 + s2.view(b, g, -1).sum(-1)
        self.n += r * W * (c // g)

    def finish(self) -> Stats:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean.square()).clamp_min(0)
        return mean.float(), (var + self.gn.eps).rsqrt().float()


def _rows(x: torch.Tensor, step: int):
    for y0 in range(0, x.shape[1], step):
        yield y0, min(x.shape[1], y0 + step)


def _stats(gn: nn.GroupNorm, x: torch.Tensor, step: int) -> Stats:
    acc = _StatsSum(gn)
    for y0, y1 in _rows(x, step):
        acc.add(x[:, y0:y1])
    return acc.finish()


def _group_norm(gn: nn.GroupNorm, t: torch.Tensor, stats: Stats) -> torch.Tensor:
    """``gn`` of a channels-last chunk ``t`` with the statistics of the whole tensor."""
    mean, rstd = stats
    rep = t.shape[-1] // gn.num_groups
    scale = rstd.repeat_interleave(rep, dim=1) * gn.weight
    shift = gn.bias - mean.repeat_interleave(rep, dim=1) * scale
    return torch.addcmul(shift[:, None, None], t, scale[:, None, None])


def _pointwise(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution (no bias) of a channels-last chunk."""
    return F.linear(t, conv.weight.flatten(1))


def _inner(rb: ResBlock, t: torch.Tensor, s1: Stats) -> torch.Tensor:
    return _pointwise(rb.block[2], F.silu(_group_norm(rb.block[0], t, s1), inplace=True))


def _res_chunk(rb: ResBlock, t: torch.Tensor, s1: Stats, s2: Stats) -> torch.Tensor:
    u = F.silu(_group_norm(rb.block[3], _inner(rb, t, s1), s2), inplace=True)
    return _pointwise(rb.block[5], u).add_(t)          # the shortcut is the identity (the width is kept)


def _res_inplace(rb: ResBlock, x: torch.Tensor, step: int) -> Tuple[Stats, Stats]:
    """``x = rb(x)`` in place, chunk by chunk; returns its GroupNorms' statistics."""
    s1 = _stats(rb.block[0], x, step)
    acc = _StatsSum(rb.block[3])
    for y0, y1 in _rows(x, step):
        acc.add(_inner(rb, x[:, y0:y1], s1))
    s2 = acc.finish()
    for y0, y1 in _rows(x, step):
        x[:, y0:y1] = _res_chunk(rb, x[:, y0:y1], s1, s2)
    return s1, s2


def _rope_rows(rope: RoPE, t: torch.Tensor, y0: int, H: int) -> torch.Tensor:
    """:class:`RoPE` of the channels-last rows ``[y0, y0 + rows)`` of an ``H``-row map."""
    b, n, W, c = t.shape
    rows = torch.linspace(0, 1, H, device=t.device, dtype=t.dtype)[y0:y0 + n]
    cols = torch.linspace(0, 1, W, device=t.device, dtype=t.dtype)
    angle = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).view(n * W, 2) @ rope.freqs
    u = t.reshape(b, n * W, c)
    u1, u2 = u.chunk(2, dim=-1)
    u = u * angle.cos() + torch.cat([-u2, u1], dim=-1) * angle.sin()
    return u.view(b, n, W, c)


class AnyUp(nn.Module):
    """The AnyUp model (official defaults: 128-d queries/keys, 4 heads, 5x5 unification filters, window 0.1)."""

    def __init__(self, qk_dim: int = 128, kernel_size_lfu: int = 5, window_ratio: float = 0.1,
                 num_heads: int = 4) -> None:
        super().__init__()
        d = qk_dim
        self.image_encoder = _encoder(_conv(3, d, 1), d, d)
        self.key_encoder = _encoder(_conv(d, d, 1), d, d)
        self.query_encoder = _encoder(_conv(d, d, 1), d, d)
        self.key_features_encoder = _encoder(FeatureUnification(d, kernel_size_lfu), d, d)
        self.cross_decode = CrossAttentionBlock(d, num_heads, window_ratio)
        self.aggregation = _encoder(_conv(2 * d, d, 3), d, d)
        self.rope = RoPE(d)

    def forward_reference(self, image: torch.Tensor, features: torch.Tensor,
                          output_size: Optional[Tuple[int, int]] = None, q_chunk: int = 4096) -> torch.Tensor:
        """The official forward, module by module, with the whole window mask (memory grows with pixels x
        cells): the reference :meth:`forward` equals up to round-off."""
        out_hw = tuple(output_size) if output_size is not None else tuple(image.shape[-2:])
        enc = self.rope(self.image_encoder(image))
        q = F.adaptive_avg_pool2d(self.query_encoder(enc), out_hw)
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), features.shape[-2:])
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(features, dim=1))], dim=1))
        return self.cross_decode(q, k, features, q_chunk=q_chunk)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Optional[Tuple[int, int]] = None,
                q_chunk: Optional[int] = None, max_bytes: Optional[int] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B x 3 x H x W`` ImageNet-normalised image, ``B x C x h x w`` features -> ``B x C x H' x W'``
        (channels-last memory format).

        Bounded memory: one ``d x H x W`` buffer (plus ``d x H' x W'`` when the output size differs from the
        image's) and the output, the rest in chunks sized from ``max_bytes`` (:mod:`densevit.upsample.memory`);
        each tile of output pixels attends over the cells its windows reach only. ``q_chunk`` caps the pixels of
        a tile; ``out`` (``B x C x H' x W'``, may be a view) receives the result."""
        b, _, H, W = image.shape
        C, (h, w) = features.shape[1], features.shape[-2:]
        Ho, Wo = tuple(int(s) for s in output_size) if output_size is not None else (H, W)
        d = self.rope.freqs.shape[1]
        fixed = FLOAT * b * (d * H * W + (d * Ho * Wo if (Ho, Wo) != (H, W) else 0) + h * w * (3 * C + 10 * d))
        budget = working_budget("anyup", FLOAT * b * C * Ho * Wo if out is None else 0, max_bytes, fixed)
        step = max(1, budget // (FLOAT * b * 6 * d * W))       # rows per chunk of the d x H x W stages
        img = image.permute(0, 2, 3, 1)
        # Image encoding, then the key branch in the same buffer.
        first, rb1, rb2 = self.image_encoder
        x = image.new_empty(b, H, W, d)
        for y0, y1 in _rows(x, step):
            x[:, y0:y1] = _pointwise(first, img[:, y0:y1])
        enc_stats = [_res_inplace(rb1, x, step), _res_inplace(rb2, x, step)]
        for y0, y1 in _rows(x, step):
            x[:, y0:y1] = _rope_rows(self.rope, x[:, y0:y1], y0, H)
        k = F.adaptive_avg_pool2d(self._branch(self.key_encoder, x, step).permute(0, 3, 1, 2), (h, w))
        # The query branch: the image encoding recomputed chunk by chunk into the buffer.
        for y0, y1 in _rows(x, step):
            t = _res_chunk(rb2, _res_chunk(rb1, _pointwise(first, img[:, y0:y1]), *enc_stats[0]), *enc_stats[1])
            x[:, y0:y1] = _rope_rows(self.rope, t, y0, H)
        q = self._branch(self.query_encoder, x, step)
        if (Ho, Wo) != (H, W):
            q = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), (Ho, Wo)).permute(0, 2, 3, 1)
        del x
        unify = self.key_features_encoder
        u = unify[0](F.normalize(features, dim=1), max_bytes=budget)
        k = self.aggregation(torch.cat([k, unify[2](unify[1](u))], dim=1))
        if out is None:
            out = torch.empty(b, C, Ho, Wo, dtype=features.dtype, device=features.device,
                              memory_format=torch.channels_last)
        self._attend(q, k, features, out, budget, q_chunk)
        return out

    @staticmethod
    def _branch(encoder: nn.Sequential, x: torch.Tensor, step: int) -> torch.Tensor:
        """``encoder(x)`` (a 1x1 conv of the same width and two ResBlocks) in place, channels-last."""
        conv, rb1, rb2 = encoder
        for y0, y1 in _rows(x, step):
            x[:, y0:y1] = _pointwise(conv, x[:, y0:y1])
        _res_inplace(rb1, x, step)
        _res_inplace(rb2, x, step)
        return x

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, budget: int,
                q_chunk: Optional[int]) -> None:
        """Windowed cross-attention of the channels-last queries ``q`` over square tiles of output pixels, each
        against the cells its windows reach (gathered), masked per pixel as :func:`window_mask`; the 3x3 query
        conv per band of tile rows."""
        block, attn = self.cross_decode, self.cross_decode.cross_attn
        b, Ho, Wo, d = q.shape
        C, h, w = v.shape[1:]
        heads, hd = attn.heads, d // attn.heads
        wq, wk, _ = attn.attention.in_proj_weight.split(d)
        bq, bk, _ = attn.attention.in_proj_bias.split(d)
        keys = F.linear(attn.norm_k(k.flatten(2).transpose(1, 2)), wk, bk)          # b x N x d
        keys = keys.view(b, h * w, heads, hd).transpose(1, 2)                        # b x heads x N x hd
        vals = v.flatten(2).transpose(1, 2)                                          # b x N x C
        ratio = block.window_ratio
        rlo, rhi = window_bounds(Ho, h, ratio, q.device)
        clo, chi = window_bounds(Wo, w, ratio, q.device)

        def cost(t: int) -> int:     # bytes of one t x t tile and its band
            n = min(h, 2 * ratio * h + t * h / Ho + 2) * min(w, 2 * ratio * w + t * w / Wo + 2) if ratio > 0 \
                else h * w
            return int(FLOAT * b * (t * t * (6 * d + 2 * C + n * (3 * heads + 3)) + n * (d + C) + 3 * (t + 2) * Wo * d))

        t = max(8, math.ceil(ratio * max(Ho, Wo) / 2)) if ratio > 0 else 64
        t = min(t, max(Ho, Wo))
        if q_chunk:
            t = min(t, max(1, math.isqrt(int(q_chunk))))
        while t > 1 and cost(t) > budget:
            t = max(1, t * 3 // 4)
        weight = block.conv2d.weight
        out_cl = out.permute(0, 2, 3, 1)                                             # b x Ho x Wo x C view
        for y0 in range(0, Ho, t):
            y1 = min(Ho, y0 + t)
            r0, r1 = int(rlo[y0]), int(rhi[y1 - 1])
            cells_r = torch.arange(r0, r1, device=q.device)
            rows_ok = (cells_r[None] >= rlo[y0:y1, None]) & (cells_r[None] < rhi[y0:y1, None])
            band = q[:, max(0, y0 - 1):min(Ho, y1 + 1)].permute(0, 3, 1, 2)
            band = F.conv2d(F.pad(band, (1, 1, int(y0 == 0), int(y1 == Ho))), weight).permute(0, 2, 3, 1)
            for x0 in range(0, Wo, t):
                x1 = min(Wo, x0 + t)
                c0, c1 = int(clo[x0]), int(chi[x1 - 1])
                cells_c = torch.arange(c0, c1, device=q.device)
                cols_ok = (cells_c[None] >= clo[x0:x1, None]) & (cells_c[None] < chi[x0:x1, None])
                qt = band[:, :, x0:x1].reshape(b, -1, d)                             # b x P x d
                P = qt.shape[1]
                qh = F.linear(attn.norm_q(qt), wq, bq).view(b, P, heads, hd).transpose(1, 2)
                idx = (cells_r[:, None] * w + cells_c[None]).reshape(-1)
                logits = (qh / math.sqrt(hd)) @ keys.index_select(2, idx).transpose(-1, -2)   # b x heads x P x n
                if ratio > 0:
                    allowed = (rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape(P, idx.numel())
                    logits = logits.masked_fill(~allowed, float("-inf"))
                p = torch.softmax(logits, dim=-1).mean(dim=1)                         # b x P x n
                out_cl[:, y0:y1, x0:x1] = (p @ vals.index_select(1, idx)).view(b, y1 - y0, x1 - x0, C)


def load_anyup(weights: Union[str, Path, Dict[str, torch.Tensor], None] = None,
               device: Union[str, torch.device] = "cpu") -> AnyUp:
    """An :class:`AnyUp` with the given state dict or checkpoint file (strict: unknown or missing keys are
    errors), ``"random"`` for the model's own initialisation, or ``None`` to search :data:`CHECKPOINTS` with
    :func:`densevit.models.locate.find_checkpoint`. Weights are loaded in float32."""
    model = AnyUp()
    if isinstance(weights, str) and weights == "random":
        return model.to(device).eval()
    if weights is None:
        weights = find_checkpoint(CHECKPOINTS)
        if weights is None:
            raise WeightsNotFoundError(f"AnyUp weights not found: looked for {describe_search(CHECKPOINTS)}; "
                                       f"pass weights=PATH or weights='random'")
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"AnyUp weights not found: no file {path}")
        state = read_checkpoint(path, "AnyUp weights")
    else:
        state = weights
    source = f"AnyUp weights {weights}" if isinstance(weights, (str, Path)) else "AnyUp state dict"
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"{source} do not hold a state dict")
    state = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}
    expected = set(model.state_dict())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise InvalidArgumentError(f"{source}: not an AnyUp state dict: {len(missing)} missing key(s) "
                                   f"{missing[:3]}, {len(unknown)} unknown key(s) {unknown[:3]}")
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def resolve_weights(weights: Union[str, Path, None], device: Union[str, torch.device] = "cpu"
                    ) -> Union[str, Path]:
    """Check AnyUp weights once, before any work: ``"random"``, a checkpoint file, or ``None`` (searched for
    :data:`CHECKPOINTS`); the file is read and checked now (then kept loaded for :func:`anyup` on ``device``), so
    a missing or bad file is one line up front, worded for Python and for the command line
    (``--upsample-weights``). Returns what to pass as ``weights=``."""
    if isinstance(weights, str) and weights == "random":
        return weights
    if weights is None:
        found = find_checkpoint(CHECKPOINTS)
        if found is None:
            looked = describe_search(CHECKPOINTS)
            raise WeightsNotFoundError(f"AnyUp weights not found: looked for {looked}; pass weights=PATH or "
                                       f"weights='random'",
                                       f"AnyUp weights not found: looked for {looked}; pass --upsample-weights FILE "
                                       f"(anyup_paper.pth or anyup_multi_backbone.pth) or --upsample-weights random")
        weights = found
    key = (str(weights), str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = load_anyup(weights, device)
    return weights


def normalize_imagenet(image: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` RGB -> ImageNet-normalised."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


_CACHE: Dict[Tuple[str, str], AnyUp] = {}


def anyup(features: torch.Tensor, image: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
          weights: Union[str, Path, AnyUp, None] = None, q_chunk: Optional[int] = None,
          max_bytes: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Upsample with AnyUp. ``image`` is the ``[0, 1]`` RGB guide; ``weights``: an :class:`AnyUp` model, a
    checkpoint path, ``"random"``, or ``None`` (search for the official files). Loaded models are cached per
    path and device. ``max_bytes`` bounds what the call allocates (:mod:`densevit.upsample.memory`): the output,
    one ``128 x H x W`` buffer and chunks; ``out`` receives the result (``B x C x H' x W'``, may be a view)."""
    check_inputs(features, image)
    out_size = output_size(out_size, image)
    if isinstance(weights, AnyUp):
        model = weights
    else:
        key = (str(weights), str(features.device))
        if key not in _CACHE or weights == "random":
            _CACHE[key] = load_anyup(weights, features.device)
        model = _CACHE[key]
    with torch.no_grad():
        if out is not None and out.dtype == torch.float32:
            return model(normalize_imagenet(image.float()), features.float(), out_size, q_chunk=q_chunk,
                         max_bytes=max_bytes, out=out)
        res = model(normalize_imagenet(image.float()), features.float(), out_size, q_chunk=q_chunk,
                    max_bytes=max_bytes)
    if out is not None:
        return out.copy_(res)
    return res.to(features.dtype)
