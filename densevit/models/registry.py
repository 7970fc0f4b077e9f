"""Backbone registry: densevit names -> timm architectures, block family, positional encoding, checkpoint
layout, normalisation, patch size and saliency heads.

A new backbone of a known family is one entry here. A new family is one entry here plus one checkpoint layout in
:data:`densevit.models.layouts.LAYOUTS` (how its official and transformers files become timm's keys); only a new
kind of block also needs an adapter in :data:`densevit.models.families.FAMILIES`, and only a new way of encoding
positions a :class:`~densevit.models.posenc.PosEncoding` (tests/test_weights.py adds a toy family that way)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .posenc import DINO, DINOV2_REG, ROPE, TIMM, PosEncoding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAT_MEAN = (0.430, 0.411, 0.296)        # DINOv3 satellite (SAT-493M) models
SAT_STD = (0.213, 0.156, 0.143)


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
    family: str = "vit"                 # block family adapter (densevit.models.families.FAMILIES)
    pos: PosEncoding = DINO             # how positions are encoded / resampled, as the official code does
    layout: str = "timm"                # checkpoint layout (densevit.models.layouts.LAYOUTS)

    @property
    def hub_name(self) -> str:
        """timm model name with its pretrained tag, as passed to ``timm.create_model``."""
        return f"{self.timm_arch}.{self.hub_tag}"

    @property
    def fine_stride(self) -> int:
        """Half the patch size (4 for /8, 7 for /14, 8 for /16): the finer stride of Amir et al. (2021), the default
        of the dense-descriptor commands on every backbone."""
        return self.patch_size // 2

    @property
    def saliency_layer(self) -> int:
        """Block whose CLS attention gives the saliency map (the last one)."""
        return self.depth - 1


def _spec(name, arch, tag, p, dim, depth, heads, sup, files, **kw) -> BackboneSpec:
    files = tuple(files) + (f"{name}.pth", f"{name}.safetensors", f"{arch}.{tag}.safetensors", f"{arch}.{tag}.pth")
    return BackboneSpec(name, arch, tag, p, dim, depth, heads, sup, weight_files=files, **kw)


_V2 = dict(layout="dinov2")
_V2_REG = dict(layout="dinov2", pos=DINOV2_REG)
_V3 = dict(family="eva", pos=ROPE, layout="dinov3")

BACKBONES: Dict[str, BackboneSpec] = {s.name: s for s in [
    # DINO v1 (Caron et al. 2021): official checkpoints share timm's key layout.
    _spec("dino_vits8", "vit_small_patch8_224", "dino", 8, 384, 12, 6, "dino",
          ["dino_deitsmall8_pretrain.pth"], saliency_heads=(0, 2, 4, 5), layout="dino"),
    _spec("dino_vits16", "vit_small_patch16_224", "dino", 16, 384, 12, 6, "dino", ["dino_deitsmall16_pretrain.pth"],
          layout="dino"),
    _spec("dino_vitb8", "vit_base_patch8_224", "dino", 8, 768, 12, 12, "dino", ["dino_vitbase8_pretrain.pth"],
          layout="dino"),
    _spec("dino_vitb16", "vit_base_patch16_224", "dino", 16, 768, 12, 12, "dino", ["dino_vitbase16_pretrain.pth"],
          layout="dino"),
    # DINOv2 (Oquab et al. 2023), with and without registers (Darcet et al. 2024). The official hub resamples the
    # position embedding of the register models by size with antialiasing, of the others by scale factor + 0.1.
    _spec("dinov2_vits14", "vit_small_patch14_dinov2", "lvd142m", 14, 384, 12, 6, "dinov2",
          ["dinov2_vits14_pretrain.pth"], **_V2),
    _spec("dinov2_vitb14", "vit_base_patch14_dinov2", "lvd142m", 14, 768, 12, 12, "dinov2",
          ["dinov2_vitb14_pretrain.pth"], **_V2),
    _spec("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "lvd142m", 14, 384, 12, 6, "dinov2",
          ["dinov2_vits14_reg4_pretrain.pth"], **_V2_REG),
    _spec("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", "lvd142m", 14, 768, 12, 12, "dinov2",
          ["dinov2_vitb14_reg4_pretrain.pth"], **_V2_REG),
    # ViT-L/14 and ViT-g/14 (ViT-g: fused SwiGLU feed-forward, timm's SwiGLUPacked).
    _spec("dinov2_vitl14", "vit_large_patch14_dinov2", "lvd142m", 14, 1024, 24, 16, "dinov2",
          ["dinov2_vitl14_pretrain.pth"], **_V2),
    _spec("dinov2_vitg14", "vit_giant_patch14_dinov2", "lvd142m", 14, 1536, 40, 24, "dinov2",
          ["dinov2_vitg14_pretrain.pth"], **_V2),
    _spec("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", "lvd142m", 14, 1024, 24, 16, "dinov2",
          ["dinov2_vitl14_reg4_pretrain.pth"], **_V2_REG),
    _spec("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", "lvd142m", 14, 1536, 40, 24, "dinov2",
          ["dinov2_vitg14_reg4_pretrain.pth"], **_V2_REG),
    # DINOv3 (Simeoni et al. 2025): Eva blocks, axial RoPE, 4 storage tokens, layer scale, masked key bias.
    # timm's *_qkvb models keep the q / v biases of the official checkpoints.
    _spec("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", "lvd1689m", 16, 384, 12, 6, "dinov3",
          ["dinov3_vits16_pretrain_lvd1689m-08c60483.pth"], **_V3),
    _spec("dinov3_vits16plus", "vit_small_plus_patch16_dinov3_qkvb", "lvd1689m", 16, 384, 12, 6, "dinov3",
          ["dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"], **_V3),
    _spec("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb", "lvd1689m", 16, 768, 12, 12, "dinov3",
          ["dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"], **_V3),
    _spec("dinov3_vitl16", "vit_large_patch16_dinov3_qkvb", "lvd1689m", 16, 1024, 24, 16, "dinov3",
          ["dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"], **_V3),
    _spec("dinov3_vitl16_sat", "vit_large_patch16_dinov3_qkvb", "sat493m", 16, 1024, 24, 16, "dinov3",
          ["dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"], mean=SAT_MEAN, std=SAT_STD, **_V3),
    # ViT-H+/16 and ViT-7B/16: SwiGLU feed-forward (timm's SwiGLU); the 7B has no q / k / v bias (timm's model
    # without _qkvb) and its untied local-crop CLS norm (training only) is not used at inference.
    _spec("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3_qkvb", "lvd1689m", 16, 1280, 32, 20, "dinov3",
          ["dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"], **_V3),
    _spec("dinov3_vit7b16", "vit_7b_patch16_dinov3", "lvd1689m", 16, 4096, 40, 32, "dinov3",
          ["dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"], **_V3),
    # Differently supervised ViTs, for comparisons with the same code (timm is their reference implementation).
    _spec("sup_vits16", "vit_small_patch16_224", "augreg_in21k_ft_in1k", 16, 384, 12, 6, "supervised", [],
          mean=INCEPTION_MEAN, std=INCEPTION_STD, pos=TIMM),
    _spec("sup_vitb16", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", 16, 768, 12, 12, "supervised", [],
          mean=INCEPTION_MEAN, std=INCEPTION_STD, pos=TIMM),
    _spec("mae_vitb16", "vit_base_patch16_224", "mae", 16, 768, 12, 12, "mae", ["mae_pretrain_vit_base.pth"],
          pos=TIMM),
    _spec("clip_vitb16", "vit_base_patch16_clip_224", "openai", 16, 768, 12, 12, "clip", [],
          mean=CLIP_MEAN, std=CLIP_STD, pos=TIMM, layout="clip"),
]}


# The official Hugging Face repositories in transformers' layout (Dinov2Model, Dinov2WithRegistersModel,
# DINOv3ViTModel), by registry name: searched in the local Hub cache, and accepted as aliases of the name.
HF_REPOS: Dict[str, str] = {
    **{f"dinov2_vit{s}14": f"facebook/dinov2-{n}" for s, n in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))},
    **{f"dinov2_vit{s}14_reg": f"facebook/dinov2-with-registers-{n}"
       for s, n in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))},
    **{f"dinov3_{a}": f"facebook/dinov3-{a}-pretrain-lvd1689m"
       for a in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")},
    "dinov3_vitl16_sat": "facebook/dinov3-vitl16-pretrain-sat493m",
}
HUB_ALIASES: Dict[str, str] = {repo: name for name, repo in HF_REPOS.items()}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by its densevit name or its Hugging Face Hub id (``facebook/dinov2-small``)."""
    from ..errors import DensevitError

    try:
        return BACKBONES[HUB_ALIASES.get(name, name)]
    except KeyError:
        raise DensevitError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)} "
                            f"(or a Hub id such as {HF_REPOS['dinov2_vits14']})") from None
