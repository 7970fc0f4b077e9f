"""Neuron visualisation by activation maximisation (Ghiasi et al., *What do Vision Transformers Learn? A Visual
Exploration*, 2022).

An input image is optimised (Adam, on a sigmoid pixel parameterisation) to maximise the mean activation of one
unit over all patch tokens of one block. Units: ``mlp`` -- a hidden neuron of the block's feed-forward layer (the
input of its second linear layer, i.e. after the non-linearity, which is what the paper visualises); ``key`` /
``query`` / ``value`` / ``token`` -- a channel of that facet (descriptor layout ``c * heads + h`` for q / k / v). The
paper's regularisers make the images interpretable: each step averages the objective over an *ensemble* of
augmented copies (random jitter by rolling up to ``jitter`` pixels, random horizontal flip, random colour shift
``x * s + m``), plus a small total-variation penalty. Steps and image size are bounded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ...errors import DensevitError

__all__ = ["UNIT_KINDS", "MAX_STEPS", "MAX_SIZE", "unit_activation", "NeuronImage", "visualize_unit",
           "visualize_units"]

UNIT_KINDS = ("mlp", "key", "query", "value", "token")
MAX_STEPS = 2000
MAX_SIZE = 512
_QKV = {"query": 0, "key": 1, "value": 2}


def _unit_count(ext, layer: int, kind: str) -> int:
    blk = ext.model.blocks[layer]
    if kind == "mlp":
        return int(blk.mlp.fc2.in_features)
    return int(ext.spec.embed_dim)


def unit_activation(ext, x: torch.Tensor, layer: int, kind: str, unit: int) -> torch.Tensor:
    """``B``: mean activation over the patch tokens of unit ``unit`` of block ``layer`` (``kind`` of
    :data:`UNIT_KINDS`) for the normalised input ``x`` ``B x 3 x H x W``; differentiable w.r.t. ``x``."""
    if kind not in UNIT_KINDS:
        raise DensevitError(f"unknown unit kind {kind!r}; choose from {', '.join(UNIT_KINDS)}")
    layer = ext.resolve_layer(layer)
    n = _unit_count(ext, layer, kind)
    if not 0 <= unit < n:
        raise DensevitError(f"unit {unit} out of range for {kind} of {ext.spec.name} (0..{n - 1})")
    P = ext.num_prefix_tokens
    tokens, _, rope = ext.adapter.embed(x.to(ext.device, ext.dtype), ext.stride)
    for blk in ext.model.blocks[:layer]:
        tokens = ext._block(blk, tokens, rope, set(), False, None)
    blk = ext.model.blocks[layer]
    if kind == "mlp":
        got: List[torch.Tensor] = []
        handle = blk.mlp.fc2.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
        try:
            ext._block(blk, tokens, rope, set(), False, None)
        finally:
            handle.remove()
        return got[0][:, P:, unit].float().mean(-1)
    rec: Dict[str, torch.Tensor] = {}
    ext._block(blk, tokens, rope, {kind}, False, rec)
    t = rec[kind]
    if kind in _QKV:                          # B x heads x N x d, channel c * heads + h
        heads = t.shape[1]
        t = t[:, unit % heads, P:, unit // heads]
    else:
        t = t[:, P:, unit]
    return t.float().mean(-1)


@dataclass
class NeuronImage:
    """One unit's visualisation."""

    layer: int
    kind: str
    unit: int
    image: np.ndarray                     # H x W x 3 uint8
    history: List[float] = field(default_factory=list)   # mean objective (augmented ensemble) per step
    start: float = float("nan")           # activation of the plain image before / after optimisation
    end: float = float("nan")


def _augment(img: torch.Tensor, jitter: int, g: torch.Generator) -> torch.Tensor:
    """Ghiasi et al.'s ensemble of transforms of one image ``1 x 3 x H x W`` in [0, 1] -> ``E x 3 x H x W``."""
    E = img.shape[0]
    out = []
    for e in range(E):
        t = img[e:e + 1]
        if jitter > 0:
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            t = torch.roll(t, shifts=(dy, dx), dims=(-2, -1))
        if bool(torch.rand((), generator=g) < 0.5):
            t = t.flip(-1)
        s = 1.0 + 0.1 * torch.randn(1, 3, 1, 1, generator=g)
        m = 0.05 * torch.randn(1, 3, 1, 1, generator=g)
        out.append(t * s.to(t) + m.to(t))
    return torch.cat(out)


def visualize_unit(ext, layer: int, kind: str, unit: int, *, size: int = 128, steps: int = 100, lr: float = 0.05,
                   ensemble: int = 4, jitter: int = 8, tv_weight: float = 0.0005, seed: int = 0,
                   progress: bool = False) -> NeuronImage:
    """Activation maximisation of one unit (module doc): ``steps`` Adam steps on a ``size x size`` image."""
    from tqdm.auto import tqdm

    if not 1 <= steps <= MAX_STEPS:
        raise DensevitError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not ext.patch_size <= size <= MAX_SIZE:
        raise DensevitError(f"image size must be in {ext.patch_size}..{MAX_SIZE}, got {size}")
    if ensemble < 1:
        raise DensevitError(f"ensemble must be at least 1, got {ensemble}")
    layer = ext.resolve_layer(layer)
    size = size - size % ext.patch_size
    mean = torch.tensor(ext.spec.mean, device=ext.device).view(1, 3, 1, 1)
    std = torch.tensor(ext.spec.std, device=ext.device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    param = (0.5 * torch.randn(1, 3, size, size, generator=g)).to(ext.device).requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    norm = lambda img: ((img - mean) / std).to(ext.dtype)           # noqa: E731

    def plain() -> float:
        with torch.no_grad():
            return float(unit_activation(ext, norm(torch.sigmoid(param)), layer, kind, unit).mean())

    start = plain()
    history = []
    for _ in tqdm(range(steps), desc=f"L{layer} {kind} {unit}", disable=not progress, leave=False):
        with torch.enable_grad():
            img = torch.sigmoid(param)
            batch = _augment(img.expand(ensemble, -1, -1, -1), jitter, g)
            act = unit_activation(ext, norm(batch), layer, kind, unit).mean()
            tv = (img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., :, 1:] - img[..., :, :-1]).abs().mean()
            loss = -act + tv_weight * tv * size * size / 100.0
            (grad,) = torch.autograd.grad(loss, param)
        param.grad = grad
        opt.step()
        history.append(float(act.detach()))
    end = plain()
    image = (torch.sigmoid(param.detach())[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return NeuronImage(layer, kind, unit, image, history, start, end)


def visualize_units(ext, layer: int, kind: str, units: Sequence[int], *, progress: bool = True,
                    **options) -> List[NeuronImage]:
    """:func:`visualize_unit` of several units of one layer (one progress bar over units x steps)."""
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(units), desc=f"neurons L{ext.resolve_layer(layer)} {kind}", disable=not progress,
               leave=False)
    for u in units:
        out.append(visualize_unit(ext, layer, kind, int(u), progress=False, **options))
        bar.update(1)
    bar.close()
    return out


def default_units(ext, layer: int, kind: str, count: Optional[int]) -> List[int]:
    """The first ``count`` units (all when ``None``)."""
    n = _unit_count(ext, ext.resolve_layer(layer), kind)
    return list(range(n if count is None else min(count, n)))
