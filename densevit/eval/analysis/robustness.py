"""Occlusion and token-drop robustness (Naseer et al., *Intriguing Properties of Vision Transformers*, NeurIPS 2021).

A share ``r`` of the image's patches is dropped, chosen

* ``random``: uniformly (a fixed seed per image),
* ``salient``: the patches of highest CLS-attention saliency first (the foreground; IPViT's "salient patch drop"
  uses DINO's CLS attention as the foreground mask),
* ``non_salient``: the lowest saliency first (the background),

and removed either by **masking pixels** (the patch's pixels set to zero in the normalised input, as IPViT does) or by
**dropping the tokens** from the sequence (their position embeddings go with them; CLS and register tokens stay).
Per layer, the block outputs of the *kept* patches and the CLS token are compared with the unoccluded run by cosine
similarity (1 = unchanged). Given a classifier (CLS of the last block through the model's final norm, then a linear
head) and labels, top-1 accuracy is measured too, as in the paper's occlusion curves. Dropping 0 % reproduces the
unoccluded run exactly. Runs at the patch stride (a dropped patch is one token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DensevitError
from .attention import resolve_layers

__all__ = ["DROP_MODES", "OCCLUSIONS", "DEFAULT_RATIOS", "drop_order", "dropped_mask", "mask_pixels",
           "forward_tokens", "RobustnessStats", "occlusion_robustness"]

DROP_MODES = ("random", "salient", "non_salient")
OCCLUSIONS = ("pixels", "tokens")
DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(10))         # 0 .. 0.9


def drop_order(saliency: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Patch indices ``T`` in the order they are dropped (``mode``: one of :data:`DROP_MODES`)."""
    if mode == "random":
        return torch.randperm(saliency.numel(), generator=generator)
    if mode == "salient":
        return torch.argsort(saliency.flatten().cpu(), descending=True, stable=True)
    if mode == "non_salient":
        return torch.argsort(saliency.flatten().cpu(), descending=False, stable=True)
    raise DensevitError(f"unknown drop mode {mode!r}; choose from {', '.join(DROP_MODES)}")


def dropped_mask(order: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean ``T`` mask, True for the first ``round(ratio * T)`` patches of ``order``."""
    if not 0.0 <= ratio < 1.0:
        raise DensevitError(f"drop ratio must be in [0, 1), got {ratio}")
    T = order.numel()
    m = torch.zeros(T, dtype=torch.bool)
    m[order[: int(round(ratio * T))]] = True
    return m


def mask_pixels(x: torch.Tensor, dropped: torch.Tensor, grid_hw: Tuple[int, int], patch: int) -> torch.Tensor:
    """``B x 3 x H x W`` normalised input with the pixels of the dropped patches (``T`` bool, row-major on
    ``grid_hw``) set to zero."""
    h, w = grid_hw
    keep = (~dropped).view(1, 1, h, w).to(x.dtype).to(x.device)
    keep = keep.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    out = x.clone()
    out[..., : h * patch, : w * patch] *= keep
    return out


def forward_tokens(ext, x: torch.Tensor, layers: Sequence[int], keep: Optional[torch.Tensor] = None
                   ) -> Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``{layer: (patch tokens B x T_kept x D, CLS B x D or None)}`` of the block outputs, with only the patch
    tokens ``keep`` (indices, row-major) in the sequence (``None``: all). The last block's CLS is also returned
    under key ``-1`` after the model's final norm (the classifier's input)."""
    P = ext.num_prefix_tokens
    has_cls = getattr(ext.model, "cls_token", None) is not None
    with torch.inference_mode():
        tokens, _, rope = ext.adapter.embed(x.to(ext.device, ext.dtype), ext.stride)
        if keep is not None:
            k = keep.to(tokens.device)
            tokens = torch.cat([tokens[:, :P], tokens[:, P:][:, k]], dim=1)
            if rope is not None:
                rope = (rope[0][k.to(rope[0].device)], rope[1][k.to(rope[1].device)])
        want = set(layers)
        out = {}
        last = max(want)
        for i, blk in enumerate(ext.model.blocks[: last + 1]):
            tokens = ext._block(blk, tokens, rope, set(), False, None)
            if i in want:
                out[i] = (tokens[:, P:].float(), tokens[:, 0].float() if has_cls else None)
        if last == ext.depth - 1 and has_cls:
            out[-1] = (tokens[:, :0].float(), ext.model.norm(tokens)[:, 0].float())
    return out


@dataclass
class RobustnessStats:
    """Mean cosine to the unoccluded run per (occlusion, mode, ratio, layer); top-1 per (occlusion, mode, ratio)."""

    layers: List[int]
    ratios: List[float]
    modes: List[str]
    occlusions: List[str]
    descriptor_cos: np.ndarray        # O x M x R x L
    cls_cos: np.ndarray               # O x M x R x L (NaN without CLS)
    top1: Optional[np.ndarray] = None  # O x M x R, and clean top-1 in meta
    meta: Dict[str, object] = field(default_factory=dict)

    def records(self) -> List[Dict[str, object]]:
        rows = []
        for o, occ in enumerate(self.occlusions):
            for m, mode in enumerate(self.modes):
                for r, ratio in enumerate(self.ratios):
                    for li, l in enumerate(self.layers):
                        row = {"occlusion": occ, "mode": mode, "ratio": ratio, "layer": int(l),
                               "descriptor_cos": float(self.descriptor_cos[o, m, r, li]),
                               "cls_cos": float(self.cls_cos[o, m, r, li])}
                        if self.top1 is not None:
                            row["top1"] = float(self.top1[o, m, r])
                        rows.append(row)
        return rows

    def to_json(self) -> Dict[str, object]:
        return {"layers": [int(l) for l in self.layers], "ratios": list(self.ratios), "modes": list(self.modes),
                "occlusions": list(self.occlusions), "descriptor_cos": self.descriptor_cos.tolist(),
                "cls_cos": self.cls_cos.tolist(),
                "top1": None if self.top1 is None else self.top1.tolist(), **self.meta}


def occlusion_robustness(ext, images: Sequence, *, load_size: int = 224, layers: Optional[Iterable[int]] = None,
                         ratios: Sequence[float] = DEFAULT_RATIOS, modes: Sequence[str] = DROP_MODES,
                         occlusions: Sequence[str] = OCCLUSIONS,
                         classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         labels: Optional[Sequence[int]] = None, seed: int = 0, progress: bool = True,
                         desc: str = "robustness") -> RobustnessStats:
    """:class:`RobustnessStats` of an extractor (at its patch stride) over images, each resized to
    ``load_size x load_size``. ``classifier`` maps the final-normed CLS ``B x D`` to logits; with ``labels`` (one
    class index per image) top-1 accuracy is measured."""
    from tqdm.auto import tqdm

    if ext.stride != ext.patch_size:
        raise DensevitError(f"occlusion robustness runs at the patch stride ({ext.patch_size}), not {ext.stride}")
    for m in modes:
        if m not in DROP_MODES:
            raise DensevitError(f"unknown drop mode {m!r}; choose from {', '.join(DROP_MODES)}")
    for o in occlusions:
        if o not in OCCLUSIONS:
            raise DensevitError(f"unknown occlusion {o!r}; choose from {', '.join(OCCLUSIONS)}")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise DensevitError(f"drop ratio must be in [0, 1), got {r}")
    if labels is not None and len(labels) != len(images):
        raise DensevitError(f"{len(labels)} labels for {len(images)} images")
    layers = resolve_layers(ext.depth, layers)
    fwd_layers = sorted(set(layers) | ({ext.depth - 1} if classifier is not None else set()))
    O, M, R, L = len(occlusions), len(modes), len(ratios), len(layers)
    dcos = np.zeros((O, M, R, L))
    ccos = np.zeros((O, M, R, L))
    hits = np.zeros((O, M, R))
    clean_hits = 0
    bar = tqdm(total=len(images) * O * M * R, desc=desc, disable=not progress, leave=False)
    for n, img in enumerate(images):
        x, grid = ext.preprocess(img, (load_size, load_size))
        T = grid.shape[0] * grid.shape[1]
        clean = forward_tokens(ext, x, fwd_layers)
        sal = ext.extract_saliency_maps(x)[0].float().cpu()
        if classifier is not None and labels is not None:
            clean_hits += int(classifier(clean[-1][1]).argmax(-1)[0].item() == int(labels[n]))
        for mi, mode in enumerate(modes):
            order = drop_order(sal, mode, torch.Generator().manual_seed(seed * 1_000_003 + n))
            for ri, ratio in enumerate(ratios):
                dropped = dropped_mask(order, ratio)
                keep = torch.nonzero(~dropped).flatten()
                for oi, occ in enumerate(occlusions):
                    if occ == "pixels":
                        got = forward_tokens(ext, mask_pixels(x, dropped, grid.shape, ext.patch_size), fwd_layers)
                        sel = keep
                    else:
                        got = forward_tokens(ext, x, fwd_layers, keep=keep)
                        sel = None
                    for li, l in enumerate(layers):
                        ref_t, ref_c = clean[l]
                        t, c = got[l]
                        ref_t = ref_t[:, keep.to(ref_t.device)]
                        if sel is not None:
                            t = t[:, sel.to(t.device)]
                        dcos[oi, mi, ri, li] += float(F.cosine_similarity(t, ref_t, dim=-1).mean())
                        ccos[oi, mi, ri, li] += (float(F.cosine_similarity(c, ref_c, dim=-1).mean())
                                                 if c is not None else float("nan"))
                    if classifier is not None and labels is not None:
                        hits[oi, mi, ri] += int(classifier(got[-1][1]).argmax(-1)[0].item() == int(labels[n]))
                    bar.update(1)
    bar.close()
    N = len(images)
    top1 = hits / N if classifier is not None and labels is not None else None
    meta = {"backbone": ext.spec.name, "load_size": load_size, "num_images": N, "seed": seed,
            "patches": T}
    if top1 is not None:
        meta["clean_top1"] = clean_hits / N
    return RobustnessStats(layers, [float(r) for r in ratios], list(modes), list(occlusions), dcos / N, ccos / N,
                           top1, meta)


def linear_classifier(path, ext) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear head from a file (a state dict with ``weight`` / ``bias``, or ``head.weight`` / ``head.bias``, as
    timm's classifiers save it): ``CLS B x D -> logits B x classes``."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a one-line error
        raise DensevitError(f"cannot read the classifier head {path}: {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    w = sd.get("weight", sd.get("head.weight")) if isinstance(sd, dict) else None
    b = sd.get("bias", sd.get("head.bias")) if isinstance(sd, dict) else None
    if w is None or w.dim() != 2 or w.shape[1] != ext.spec.embed_dim:
        raise DensevitError(f"{path}: no linear head with {ext.spec.embed_dim} inputs ('weight' or 'head.weight')")
    w, b = w.float(), (b.float() if b is not None else None)
    return lambda cls: F.linear(cls.float().cpu(), w, b)
