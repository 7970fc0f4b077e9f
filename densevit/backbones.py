"""Backbone registry: densevit names -> timm architectures, normalisation, patch size and saliency heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """What densevit needs to know about one backbone."""

    name: str
    timm_arch: str                      # timm architecture (no pretrained tag)
    hub_tag: str                        # timm pretrained tag, e.g. "dino" -> "vit_small_patch8_224.dino"
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    supervision: str                    # "dino", "dinov2", "supervised", "mae", "clip"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    saliency_heads: Optional[Tuple[int, ...]] = None   # None: all heads
    weight_files: Tuple[str, ...] = field(default_factory=tuple)  # conventional file names in $DENSEVIT_WEIGHTS

    @property
    def hub_name(self) -> str:
        """timm model name with its pretrained tag, as passed to ``timm.create_model``."""
        return f"{self.timm_arch}.{self.hub_tag}"

    @property
    def saliency_layer(self) -> int:
        """Block whose CLS attention gives the saliency map (the last one)."""
        return self.depth - 1


def _spec(name, arch, tag, p, dim, depth, heads, sup, files, **kw) -> BackboneSpec:
    files = tuple(files) + (f"{name}.pth", f"{name}.safetensors", f"{arch}.{tag}.safetensors", f"{arch}.{tag}.pth")
    return BackboneSpec(name, arch, tag, p, dim, depth, heads, sup, weight_files=files, **kw)


BACKBONES: Dict[str, BackboneSpec] = {s.name: s for s in [
    # DINO v1 (Caron et al. 2021): official checkpoints share timm's key layout.
    _spec("dino_vits8", "vit_small_patch8_224", "dino", 8, 384, 12, 6, "dino",
          ["dino_deitsmall8_pretrain.pth"], saliency_heads=(0, 2, 4, 5)),
    _spec("dino_vits16", "vit_small_patch16_224", "dino", 16, 384, 12, 6, "dino", ["dino_deitsmall16_pretrain.pth"]),
    _spec("dino_vitb8", "vit_base_patch8_224", "dino", 8, 768, 12, 12, "dino", ["dino_vitbase8_pretrain.pth"]),
    _spec("dino_vitb16", "vit_base_patch16_224", "dino", 16, 768, 12, 12, "dino", ["dino_vitbase16_pretrain.pth"]),
    # DINOv2 (Oquab et al. 2023), with and without registers (Darcet et al. 2024).
    _spec("dinov2_vits14", "vit_small_patch14_dinov2", "lvd142m", 14, 384, 12, 6, "dinov2",
          ["dinov2_vits14_pretrain.pth"]),
    _spec("dinov2_vitb14", "vit_base_patch14_dinov2", "lvd142m", 14, 768, 12, 12, "dinov2",
          ["dinov2_vitb14_pretrain.pth"]),
    _spec("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "lvd142m", 14, 384, 12, 6, "dinov2",
          ["dinov2_vits14_reg4_pretrain.pth"]),
    _spec("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", "lvd142m", 14, 768, 12, 12, "dinov2",
          ["dinov2_vitb14_reg4_pretrain.pth"]),
    # Differently supervised ViTs, for comparisons with the same code.
    _spec("sup_vits16", "vit_small_patch16_224", "augreg_in21k_ft_in1k", 16, 384, 12, 6, "supervised", [],
          mean=INCEPTION_MEAN, std=INCEPTION_STD),
    _spec("sup_vitb16", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", 16, 768, 12, 12, "supervised", [],
          mean=INCEPTION_MEAN, std=INCEPTION_STD),
    _spec("mae_vitb16", "vit_base_patch16_224", "mae", 16, 768, 12, 12, "mae", ["mae_pretrain_vit_base.pth"]),
    _spec("clip_vitb16", "vit_base_patch16_clip_224", "openai", 16, 768, 12, 12, "clip", [],
          mean=CLIP_MEAN, std=CLIP_STD),
]}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by its densevit name."""
    from .errors import DensevitError

    try:
        return BACKBONES[name]
    except KeyError:
        raise DensevitError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None
