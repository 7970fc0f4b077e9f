"""Checkpoint layouts: one table (:data:`LAYOUTS`) from each layout a registry entry names
(:attr:`BackboneSpec.layout <densevit.models.registry.BackboneSpec.layout>`) to its converters.

A layout's ``official`` converter turns a file of the family's official code into timm's keys (plus tensors timm
keeps outside its state dict); its ``transformers`` converters (:mod:`densevit.models.convert_hf`) turn the files
of each Hugging Face transformers class into that official layout first. So a new backbone family is one
registry row (:mod:`densevit.models.registry`) plus one :class:`Layout` here, and a block adapter
(:mod:`densevit.models.families`) only for a new kind of block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from torch import nn

from ..errors import DensevitError
from . import convert_hf

__all__ = ["Converted", "Layout", "LAYOUTS", "get_layout", "transformers_layout"]

Converted = Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]
"""(state dict in timm's keys, extras: tensors timm keeps outside its state dict, by attribute path)."""
OfficialConverter = Callable[[Dict[str, torch.Tensor], nn.Module], Converted]
TransformersConverter = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: ``official`` (official file -> timm, given the model) and ``transformers``
    (transformers class name, as :func:`densevit.models.convert_hf.detect` tells it -> converter of its files,
    given their ``config.json``, into this official layout)."""

    name: str
    official: OfficialConverter
    transformers: Mapping[str, TransformersConverter] = field(default_factory=dict)


def _convert_timm(sd: Dict[str, torch.Tensor], model: nn.Module) -> Converted:
    """timm's own layout (and DINO's official one, which is the same): nothing to convert."""
    return sd, {}


_V2_SWIGLU = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))


def _convert_dinov2(sd: Dict[str, torch.Tensor], model: nn.Module) -> Converted:
    """facebookresearch/dinov2 layout -> timm. With registers, timm's model keeps no position for the prefix
    tokens, so the CLS position is folded into the CLS token (the official code adds it there). ViT-g's fused
    SwiGLU ``w12`` (gate rows first, as the official ``chunk(2)`` reads them) / ``w3`` are timm's packed
    ``SwiGLUPacked`` ``fc1`` / ``fc2``, unchanged."""
    if "register_tokens" not in sd and "mask_token" not in sd and not any(".mlp.w12." in k for k in sd):
        return sd, {}
    sd = dict(sd)
    for k in [k for k in sd if ".mlp.w12." in k or ".mlp.w3." in k]:
        new = k
        for a, b in _V2_SWIGLU:
            new = new.replace(a, b)
        sd[new] = sd.pop(k)
    sd.pop("mask_token", None)  # masked-image training only: the official inference never reads it
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return sd, {}


_V3_RENAMES = (("storage_tokens", "reg_token"), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"),
               (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2."))


def _convert_dinov3(sd: Dict[str, torch.Tensor], model: nn.Module) -> Converted:
    """facebookresearch/dinov3 layout -> timm ``Eva``: storage tokens are timm's register tokens, ``ls{1,2}.gamma``
    its ``gamma_{1,2}``, the SwiGLU ``w1/w2/w3`` its ``fc1_g/fc1_x/fc2``; the fused qkv bias times its
    ``bias_mask`` (which zeroes the key bias) is split into ``q_bias`` / ``v_bias`` after checking that the key
    part is exactly zero. ``rope_embed.periods`` is returned as an extra (timm keeps it out of the state dict).
    ``mask_token`` (masked training only; the official inference adds ``0 * mask_token``) and
    ``local_cls_norm`` (local crops during training only) are not used by the official inference."""
    if "storage_tokens" not in sd and "rope_embed.periods" not in sd:
        return sd, {}
    out: Dict[str, torch.Tensor] = {}
    extras: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "mask_token" or k.startswith("local_cls_norm."):
            continue
        if k == "rope_embed.periods":
            extras["rope.periods"] = v
            continue
        if k.endswith(".attn.qkv.bias_mask"):
            continue
        if k.endswith(".attn.qkv.bias"):
            mask = sd.get(k + "_mask")
            bias = v.float() * mask.float() if mask is not None else v.float()
            q, kb, vb = bias.chunk(3)
            if torch.count_nonzero(kb):
                raise DensevitError(f"{k}: the key bias is not zero, which the DINOv3 model does not have")
            pre = k[: -len("qkv.bias")]
            out[pre + "q_bias"], out[pre + "v_bias"] = q, vb
            continue
        for a, b in _V3_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out, extras


def _convert_clip(sd: Dict[str, torch.Tensor], model: nn.Module) -> Converted:
    """OpenAI CLIP layout -> timm (timm's converter; only the image tower ``visual.*`` is the backbone)."""
    if "visual.class_embedding" not in sd:
        return sd, {}
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(sd, model), {}


LAYOUTS: Dict[str, Layout] = {lay.name: lay for lay in [
    Layout("timm", _convert_timm),
    Layout("dino", _convert_timm),
    Layout("dinov2", _convert_dinov2, {convert_hf.DINOV2: convert_hf.dinov2_to_official,
                                       convert_hf.DINOV2_REG: convert_hf.dinov2_to_official}),
    Layout("dinov3", _convert_dinov3, {convert_hf.DINOV3: convert_hf.dinov3_to_official}),
    Layout("clip", _convert_clip),
]}


def get_layout(name: str) -> Layout:
    """The layout called ``name`` (a key of :data:`LAYOUTS`)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DensevitError(f"unknown checkpoint layout {name!r}; known: {', '.join(LAYOUTS)}") from None


def transformers_layout(kind: str) -> Layout:
    """The layout whose official files a transformers class (``Dinov2Model``, ...) converts into."""
    for layout in LAYOUTS.values():
        if kind in layout.transformers:
            return layout
    raise DensevitError(f"no checkpoint layout reads transformers {kind} files")
