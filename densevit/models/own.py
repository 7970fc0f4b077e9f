"""Bring your own model: a module built elsewhere, run through densevit's block-family adapters.

Accepted: a timm ``VisionTransformer`` or ``Eva`` (run as it is), or an official DINO / DINOv2 / DINOv3 module
from their hub code (recognised by its state dict's layout, converted exactly into the timm equivalent by the
same converters as their checkpoint files, strict rule included). Preprocessing (mean / std), position
resampling and saliency heads come from the registry entry named by ``backbone``, else from the entry of the
module's timm architecture (timm) or of its layout and width (official); the structure (patch size, width,
depth, heads) always comes from the module.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import DensevitError
from .posenc import ROPE, TIMM
from .registry import BACKBONES, BackboneSpec, get_spec
from .weights import load_state

__all__ = ["adopt_module"]

_TIMM_FAMILIES = {"VisionTransformer": "vit", "Eva": "eva"}
TIMM_MEAN, TIMM_STD = BACKBONES["dino_vits8"].mean, BACKBONES["dino_vits8"].std   # ImageNet


def _with_structure(spec: BackboneSpec, model: nn.Module, family: str) -> BackboneSpec:
    """``spec`` with the patch size, width, depth and heads of ``model`` (a timm module)."""
    if spec.family != family:
        raise DensevitError(f"backbone {spec.name!r} uses {spec.family!r} blocks, the module has {family!r} blocks")
    return dataclasses.replace(spec, patch_size=int(model.patch_embed.patch_size[0]), embed_dim=int(model.embed_dim),
                               depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads))


def _timm_template(model: nn.Module, family: str) -> BackboneSpec:
    """The registry entry of a timm module's architecture (and pretrained tag), else a generic one (timm's own
    position resampling and the module's normalisation)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    same = [s for s in BACKBONES.values() if s.timm_arch == arch]
    match = [s for s in same if s.hub_tag == tag] or same
    if match:
        return match[0]
    if family == "eva":
        raise DensevitError(f"Eva module {arch or type(model).__name__!r} is not a DINOv3 architecture densevit "
                            "knows; pass backbone= naming the registry entry whose conventions it follows")
    return BackboneSpec(name=str(arch or "own_vit"), timm_arch=str(arch or "vit"), hub_tag=str(tag or ""),
                        patch_size=0, embed_dim=0, depth=0, num_heads=0, supervision="own",
                        mean=tuple(cfg.get("mean", TIMM_MEAN)), std=tuple(cfg.get("std", TIMM_STD)), pos=TIMM)



def _official_layout(sd: Dict[str, torch.Tensor]) -> str:
    if "storage_tokens" in sd or "rope_embed.periods" in sd:
        return "dinov3"
    if "mask_token" in sd or "register_tokens" in sd:
        return "dinov2"
    if "cls_token" in sd and "pos_embed" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "dino"
    raise DensevitError("model= takes a timm VisionTransformer / Eva or an official DINO / DINOv2 / DINOv3 module; "
                        f"{type(sd).__name__} keys such as {next(iter(sd), '?')!r} are neither")


def _candidates(sd: Dict[str, torch.Tensor], layout: str, backbone: Optional[str]) -> List[BackboneSpec]:
    """Registry entries an official module may correspond to: ``backbone`` if given, else every entry of the same
    layout, patch size and width, in registry order (the first whose model the state dict fits is taken)."""
    if backbone is not None:
        spec = get_spec(backbone)
        if spec.layout != layout:
            raise DensevitError(f"backbone {backbone!r} reads the {spec.layout!r} layout, the module is {layout!r}")
        return [spec]
    patch, dim = sd["patch_embed.proj.weight"].shape[-1], sd["cls_token"].shape[-1]
    found = [s for s in BACKBONES.values() if (s.layout, s.patch_size, s.embed_dim) == (layout, patch, dim)]
    if not found:
        raise DensevitError(f"no registered {layout} backbone has patch {patch} and width {dim}; pass backbone=")
    return found


def _adopt_official(module: nn.Module, backbone: Optional[str]) -> Tuple[nn.Module, BackboneSpec]:
    import timm

    sd = {k: v.detach() for k, v in module.state_dict().items()}
    layout = _official_layout(sd)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    errors = []
    for spec in _candidates(sd, layout, backbone):
        kwargs = {"depth": depth} if depth != spec.depth else {}
        if "pos_embed" in sd:                   # the module's own position grid (DINOv2: 518 px, DINO: 224 px)
            kwargs["img_size"] = math.isqrt(sd["pos_embed"].shape[1] - 1) * spec.patch_size
        with torch.device("meta"):
            model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=0, **kwargs)
        spec = _with_structure(spec, model, spec.family)
        try:
            load_state(model, spec, sd, f"of the {type(module).__name__} module")
        except DensevitError as exc:
            errors.append(str(exc))
            continue
        return model, spec
    raise DensevitError(errors[0])


def adopt_module(module: nn.Module, backbone: Optional[str] = None) -> Tuple[nn.Module, BackboneSpec]:
    """``(timm model in eval mode, spec)`` for a user's module (see the module docstring). A timm module is used
    as it is (not copied); an official one is converted into a new timm model holding its weights."""
    if not isinstance(module, nn.Module):
        raise DensevitError(f"model= must be a torch.nn.Module, got {type(module).__name__}")
    family = _TIMM_FAMILIES.get(type(module).__name__)
    if family is not None and type(module).__module__.startswith("timm."):
        template = get_spec(backbone) if backbone is not None else _timm_template(module, family)
        if template.pos == ROPE and getattr(module, "rope", None) is None:
            raise DensevitError(f"backbone {template.name!r} uses rotary positions; the module has none")
        return module.eval(), _with_structure(template, module, family)
    model, spec = _adopt_official(module, backbone)
    return model.eval(), spec
