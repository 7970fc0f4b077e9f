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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.k // 2
        y = F.conv2d(F.pad(x, (p, p, p, p)), self.basis.repeat(c, 1, 1, 1), groups=c)
        ones = x.new_ones(1, 1, h, w)
        y = y / F.conv2d(F.pad(ones, (p, p, p, p)), x.new_ones(1, 1, self.k, self.k))
        return torch.softmax(y.view(b, self.n, c, h, w), dim=1).mean(dim=2)


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
    def bounds(n_out: int, n_low: int) -> Tuple[torch.Tensor, torch.Tensor]:
        t = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) / n_out
        lo = ((t - ratio).clamp(0, 1) * n_low).floor().long()
        hi = ((t + ratio).clamp(0, 1) * n_low).ceil().long()
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

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Optional[Tuple[int, int]] = None,
                q_chunk: int = 4096) -> torch.Tensor:
        """``B x 3 x H x W`` ImageNet-normalised image, ``B x C x h x w`` features -> ``B x C x H' x W'``."""
        out_hw = tuple(output_size) if output_size is not None else tuple(image.shape[-2:])
        enc = self.rope(self.image_encoder(image))
        q = F.adaptive_avg_pool2d(self.query_encoder(enc), out_hw)
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), features.shape[-2:])
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(features, dim=1))], dim=1))
        return self.cross_decode(q, k, features, q_chunk=q_chunk)


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
          weights: Union[str, Path, AnyUp, None] = None, q_chunk: int = 4096) -> torch.Tensor:
    """Upsample with AnyUp. ``image`` is the ``[0, 1]`` RGB guide; ``weights``: an :class:`AnyUp` model, a
    checkpoint path, ``"random"``, or ``None`` (search for the official files). Loaded models are cached per
    path and device."""
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
        out = model(normalize_imagenet(image.float()), features.float(), out_size, q_chunk=q_chunk)
    return out.to(features.dtype)
